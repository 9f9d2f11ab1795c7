"""A checkpoint saved under one CI leg's megatron-core resumes under the other's.

CI runs two legs (``.ci/run``): Python 3.11 with megatron-core 0.16.1 in ``.venv/`` and Python 3.12
with 0.19.x in ``.venv312/``. Each leg runs this test once, saving with the *other* leg's
interpreter (the symnoise-finetune command under torchrun) and resuming here, so the two legs
together cover both directions. It skips, saying why, where the other leg's venv is absent.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.training.test_distributed_optimizer import train_or_error
from tests.training.test_trainer import BASE, converted_tiny, data_prefix  # noqa: F401 (fixtures)

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
# The two legs' venvs, as tools/bootstrap.sh names them.
LEG_VENVS = (ROOT / ".venv", ROOT / ".venv312")


def other_leg_python():
    """The other leg's interpreter and its megatron-core version, or a reason to skip."""
    here = Path(sys.prefix).resolve()
    others = [venv for venv in LEG_VENVS if venv.resolve() != here]
    if len(others) != 1:
        return None, f"this interpreter ({sys.prefix}) is neither CI leg's venv ({', '.join(map(str, LEG_VENVS))})"
    python = others[0] / "bin" / "python"
    if not python.exists():
        return None, f"no {python}: `bash tools/bootstrap.sh {'py312' if others[0].name == '.venv312' else ''}` makes it"
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('megatron-core'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return python, version


def flags(config):
    """The finetune command's flags for a TrainingConfig keyword dict."""
    from symnoise_megatron.training.arguments import flag_name

    out = []
    for name, value in config.items():
        flag = flag_name(name)
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        elif value is not None and value is not False:
            out += [flag, str(value)]
    return out


def test_a_checkpoint_of_the_other_legs_megatron_core_resumes_here(data_prefix, tmp_path):  # noqa: F811
    import importlib.metadata

    other_python, other_version = other_leg_python()
    if other_python is None:
        pytest.skip(other_version)
    here_version = importlib.metadata.version("megatron-core")
    if other_version == here_version:
        pytest.skip(f"both legs have megatron-core {here_version}: nothing crosses a version")
    # The distributed optimizer's state (Megatron-LM's default dp_reshardable format) over DP 2: the
    # part of the checkpoint whose layout megatron-core changes most between releases.
    common = dict(BASE, data_path=[data_prefix], use_distributed_optimizer=True, eval_interval=None)

    # The first two iterations under the other leg, with the command a user runs.
    command = [str(other_python), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "symnoise_megatron.finetune", *flags(dict(common, save=str(tmp_path / "stopped"), exit_interval=2))]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    saved_there = [float(value) for value in re.findall(r"\| lm loss: (\S+) \|", done.stdout)]
    assert len(saved_there) == 2, done.stdout[-2000:]

    # Here: the uninterrupted run, and the resume of the other leg's checkpoint.
    straight, resumed = run_distributed(train_or_error, 2, [
        dict(common, save=str(tmp_path / "straight")), dict(common, save=str(tmp_path / "stopped"))])[0]
    assert isinstance(resumed, list), resumed
    where = f"saved under megatron-core {other_version}, resumed under {here_version}"
    # Both legs compute the same model (other torch builds: rounding only), and the resume continues
    # the uninterrupted run: weights, Adam moments, step count, scheduler and sampler all came across.
    assert saved_there == pytest.approx(straight[:2], rel=1e-5), where
    assert resumed == pytest.approx(straight[2:], rel=1e-5), where
    (tmp_path / "losses.json").write_text(json.dumps({"other": saved_there, "straight": straight, "resumed": resumed}))
