"""The front door: a wheel built from this repository and installed (not editable) into a fresh
venv puts every command on PATH, with the bundled data they need; two of them run from a folder
outside the checkout.

Nothing is downloaded: the fresh venv sees this interpreter's site-packages (torch,
megatron-core, ...) through a .pth file, after its own, so the package comes from the wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

# Builds a wheel and starts interpreters that import torch and megatron-core: not the quick suite.
pytestmark = pytest.mark.distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMANDS = ["symnoise-preprocess", "symnoise-finetune", "symnoise-convert", "symnoise-verify", "symnoise-generate",
            "symnoise-evaluate", "symnoise-metrics", "symnoise-compare", "symnoise-split", "symnoise-plan",
            "symnoise-materialize", "symnoise-inspect"]


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The fresh venv's bin folder and an environment that finds its commands first."""
    root = tmp_path_factory.mktemp("front_door")
    # The build runs on a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = root / "source"
    shutil.copytree(os.path.join(REPO, "symnoise_megatron"), source / "symnoise_megatron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in os.listdir(REPO):
        if os.path.isfile(os.path.join(REPO, name)):
            shutil.copy(os.path.join(REPO, name), source / name)
    # No build isolation: this venv's setuptools builds it (since 70.1 without the wheel
    # package; torch itself requires setuptools >= 77).
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"), str(source)])
    (wheel,) = (root / "dist").glob("*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    # Installed before the .pth exists, so this pip sees no other symnoise-megatron to replace.
    run(pip + ["--python", python, "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)])
    site_packages = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    # Plain path lines: the .pth files in these folders (this checkout's editable install among
    # them) are not processed, so nothing maps the package back to a checkout.
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    with open(os.path.join(site_packages, "dependencies.pth"), "w") as handle:
        handle.write("".join(path + "\n" for path in ours))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")
    work = root / "work"
    work.mkdir()
    return {"venv": str(venv), "python": python, "env": env, "cwd": str(work)}


def in_venv(installed, command):
    return run(command, env=installed["env"], cwd=installed["cwd"])


def test_the_wheel_is_what_runs_with_its_data_and_commands(installed):
    report = json.loads(in_venv(installed, [installed["python"], "-c", (
        "import json, importlib.metadata as m, symnoise_megatron.data as d; "
        "scripts = [e.name for e in m.distribution('symnoise-megatron').entry_points if e.group == 'console_scripts']; "
        "print(json.dumps([d.__file__, d.BUNDLED_INSTRUCTIONS, d.BUNDLED_TOKENIZER, scripts]))")]))
    package, instructions, tokenizer, scripts = report
    venv = os.path.realpath(installed["venv"]) + os.sep
    for path in (package, instructions, tokenizer):
        assert os.path.realpath(path).startswith(venv) and os.path.isfile(path), path
    assert sorted(scripts) == sorted(COMMANDS)
    for command in COMMANDS:
        assert shutil.which(command, path=installed["env"]["PATH"]) == os.path.join(installed["venv"], "bin", command)


def test_every_command_answers_help(installed):
    # The scripts pip wrote, run in one interpreter: one import of torch and megatron-core, not ten.
    code = ("import contextlib, io, json, runpy, sys\n"
            "answers = {}\n"
            "for script in sys.argv[1:]:\n"
            "    sys.argv = [script, '--help']\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try:\n"
            "            runpy.run_path(script, run_name='__main__')\n"
            "        except SystemExit as exit:\n"
            "            answers[script] = [exit.code, out.getvalue()]\n"
            "print(json.dumps(answers))\n")
    scripts = [os.path.join(installed["venv"], "bin", command) for command in COMMANDS]
    answers = json.loads(in_venv(installed, [installed["python"], "-c", code] + scripts))
    for command, script in zip(COMMANDS, scripts):
        exit_code, text = answers[script]
        assert exit_code == 0 and text.startswith(f"usage: {command} "), (command, text[:300])


def test_preprocess_runs_on_the_bundled_data(installed):
    paths = json.loads(in_venv(installed, [installed["python"], "-c", (
        "import json, symnoise_megatron.data as d; print(json.dumps([d.BUNDLED_INSTRUCTIONS, d.BUNDLED_TOKENIZER]))")]))
    instructions, tokenizer = paths
    out = in_venv(installed, ["symnoise-preprocess", "--input", instructions, "--tokenizer-model", tokenizer,
                              "--output-prefix", "data/bundled", "--no-progress"])
    data = os.path.join(installed["cwd"], "data")
    assert sorted(os.listdir(data)) == ["bundled_loss_mask.bin", "bundled_loss_mask.idx", "bundled_meta.json",
                                        "bundled_tokens.bin", "bundled_tokens.idx"]
    with open(instructions, encoding="utf-8") as handle:
        rows = len(json.load(handle))
    with open(os.path.join(data, "bundled_meta.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    assert meta["samples"] == rows > 0 and json.loads(out.splitlines()[0])["samples"] == rows


def test_metrics_runs_on_an_outputs_file(installed):
    from symnoise_megatron.evaluation.metrics import read_outputs, response_metrics

    answers = ["the cat sat on the mat and the cat sat on the mat again today",
               "a quick brown fox jumps over the lazy dog near the river bank at dawn",
               "short"]
    path = os.path.join(installed["cwd"], "outputs.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump([{"instruction": str(i), "output": text} for i, text in enumerate(answers)], handle)
    rows = json.loads(in_venv(installed, ["symnoise-metrics", "outputs.json", "--words", "8", "--format", "json"]))
    assert rows == [response_metrics(read_outputs(path), 8, "outputs.json").to_dict()]
    assert rows[0]["responses"] == 3 and rows[0]["counted"] == 2
