"""The front door: the wheel built from this repository, installed into a fresh venv with the
requirements it declares and nothing else, puts every command on PATH with the bundled data they
need and runs the whole flow from a folder outside the checkout (convert in, preprocess, two
fine-tune steps, convert out); a command that needs an extra says which in one line, and with
the extra installed as that line says, it runs.

pip resolves the wheel's install_requires against the package index (CI reaches it), pinned by
a constraints file to the versions this venv holds: constraints choose versions, never add a
package, so what the fresh venv gets is the wheel's declared closure, at the versions CI tests
(and torch is the CPU wheel on disk rather than a multi-GB CUDA build). About a minute of CI.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

# Builds and installs a wheel (the package index) and starts interpreters that import torch and
# megatron-core: not the quick suite, and the first CI leg only (tests/conftest.py).
pytestmark = [pytest.mark.distributed, pytest.mark.install]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMANDS = ["symnoise-preprocess", "symnoise-finetune", "symnoise-convert", "symnoise-verify", "symnoise-generate",
            "symnoise-evaluate", "symnoise-metrics", "symnoise-compare", "symnoise-split", "symnoise-plan",
            "symnoise-materialize", "symnoise-inspect"]
# What the extras add, none of which `pip install .` may bring.
EXTRAS_ONLY = ["transformers", "tensorboard", "wandb", "matplotlib", "lm_eval", "alpaca_eval", "gguf", "accelerate", "vllm"]


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def this_venvs_versions(path):
    """A constraints file pinning every distribution installed in this interpreter's site-packages
    to its version. Only there: once setuptools is imported, sys.path also holds its vendored
    packages, whose other versions of the same names (packaging, ...) pip cannot satisfy together."""
    site = list(dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")))
    pins = sorted({f"{dist.metadata['Name']}=={dist.version}" for dist in importlib.metadata.distributions(path=site)
                   if dist.metadata["Name"] and dist.metadata["Name"].lower() != "symnoise-megatron"})
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(pins) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The fresh venv's bin folder, an environment that finds its commands first, and how to pip
    install into it."""
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
    constraints = this_venvs_versions(root / "constraints.txt")

    def pip_install(*requirements):
        # --no-compile: no bytecode for torch's thousands of files (half the install's time).
        run(pip + ["--python", python, "install", "--no-compile", "--constraint", constraints, *requirements])

    pip_install(str(wheel))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")
    work = root / "work"
    work.mkdir()
    return {"venv": str(venv), "python": python, "env": env, "cwd": str(work), "pip_install": pip_install}


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


def test_the_plain_install_holds_no_extra(installed):
    found = json.loads(in_venv(installed, [installed["python"], "-c", (
        "import importlib.util, json, sys; print(json.dumps({m: importlib.util.find_spec(m) is not None "
        "for m in sys.argv[1:]}))")] + EXTRAS_ONLY + ["tokenizers", "megatron.core"]))
    assert found == dict({module: False for module in EXTRAS_ONLY}, tokenizers=True, **{"megatron.core": True})


def failing(installed, command):
    """A command that must stop with one line on stderr, exit code 2: that line."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=installed["env"], cwd=installed["cwd"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1, (command, result.returncode, result.stderr[-3000:])
    return result.stderr


@pytest.fixture(scope="module")
def tiny_hf_with_tokenizer_json(installed):
    """A tiny random LLaMA as Meta's releases ship: tokenizer.model and tokenizer.json (made here, with
    this venv's transformers: the input a user brings)."""
    from transformers import AutoTokenizer

    from tools.make_tiny_llama import main as make_tiny

    path = os.path.join(installed["cwd"], "tiny-hf")
    make_tiny(["--save-dir", path, "--hidden-size", "64", "--num-layers", "2"])
    AutoTokenizer.from_pretrained(path).save_pretrained(path)
    assert os.path.isfile(os.path.join(path, "tokenizer.json"))
    return path


def test_the_flow_from_a_plain_install_and_the_extras_each_command_names(installed, tiny_hf_with_tokenizer_json):
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS

    cwd = installed["cwd"]
    # Convert in and preprocess: tokenizer.json is read with tokenizers, a requirement of the package.
    in_venv(installed, ["symnoise-convert", "hf-to-megatron", "--load-dir", "tiny-hf", "--save-dir", "ckpt", "--no-progress"])
    in_venv(installed, ["symnoise-preprocess", "--input", BUNDLED_INSTRUCTIONS, "--tokenizer-dir", "tiny-hf",
                        "--output-prefix", "data/bundled", "--seq-length", "128", "--no-progress"])
    finetune = ["symnoise-finetune", "--load", "ckpt", "--finetune", "--save", "run", "--data-path", "data/bundled", "--train-iters", "2", "--global-batch-size", "4",
                "--micro-batch-size", "2", "--seq-length", "128", "--lr", "1e-3", "--log-interval", "1",
                "--noise-kind", "symmetric", "--noise-alpha", "5", "--tensorboard-dir", "run/tensorboard"]
    # The GPU presets' --tensorboard-dir without the tensorboard extra: refused at start, naming it
    # (under torchrun, the worker's line comes before torchrun's own report of a failed worker).
    line = failing(installed, finetune)
    assert 'the tensorboard extra installs it: pip install "symnoise-megatron[tensorboard]"' in line, line
    line = failing(installed, ["symnoise-verify", "--hf-dir", "tiny-hf", "--megatron-dir", "ckpt"])
    assert line.startswith("error: transformers is not installed") and '"symnoise-megatron[eval]"' in line, line
    # The line's own command, then the run it refused.
    installed["pip_install"]("symnoise-megatron[tensorboard]")
    log = in_venv(installed, ["torchrun", "--standalone", "--nproc-per-node", "1", "--no-python"] + finetune)
    assert "iteration        2/       2" in log and "saved checkpoint at iteration 2" in log, log[-3000:]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(cwd, "run", "tensorboard")))
    in_venv(installed, ["symnoise-convert", "megatron-to-hf", "--load-dir", "run", "--save-dir", "out-hf", "--no-progress"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(os.path.join(cwd, "out-hf")))

    # Answers need the eval extra's transformers. The extra also brings lm-eval and alpaca-eval (two
    # more minutes of installing, for commands this flow does not run): transformers alone here.
    with open(os.path.join(cwd, "prompts.json"), "w", encoding="utf-8") as handle:
        json.dump([{"instruction": "Name a color."}, {"instruction": "Say hello."}], handle)
    generate = ["symnoise-generate", "--hf-dir", "out-hf", "--prompt-template", "alpaca", "--prompts", "prompts.json", "--output", "answers.json",
                "--max-new-tokens", "8", "--no-progress"]
    line = failing(installed, generate)
    assert line.startswith("error: transformers is not installed") and '"symnoise-megatron[eval]"' in line, line
    installed["pip_install"]("transformers>=4.45")
    in_venv(installed, generate)
    with open(os.path.join(cwd, "answers.json"), encoding="utf-8") as handle:
        answers = json.load(handle)
    assert [row["instruction"] for row in answers] == ["Name a color.", "Say hello."]
    rows = json.loads(in_venv(installed, ["symnoise-metrics", "answers.json", "--words", "8", "--format", "json"]))
    assert rows[0]["responses"] == 2
