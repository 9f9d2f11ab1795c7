"""The docs run. Every fenced shell block (```bash, ```sh, ```shell) of README.md, docs/*.md and
examples/**/README.md has a marker on the line before it saying where it runs:

  <!-- runs-on: cpu -->      executed here, in one shared folder, on the tiny model and the bundled data
  <!-- runs-on: gpu -->      needs GPUs: checked by parsing
  <!-- runs-on: cluster -->  needs SLURM (or several nodes): checked by parsing
  <!-- runs-on: network -->  downloads or calls an API (a judge): checked by parsing
  <!-- runs-on: ci -->       CI's own commands (setting up .venv, running this suite): checked by parsing

Parsing checks each command with the real thing: a symnoise-* command (or its `python tools/X.py`
alias, `python -m symnoise_megatron.finetune`, and either under torchrun, whose own parser reads
its part) gets its argv parsed by the command's own argparse parser, flags spelled in full
(symnoise-finetune's with its --config files read and its flag checks run); `bash SCRIPT` needs
the script, bash must parse it, and each variable set for it must be read by it or the files
beside it; `pip install` extras must be declared and pins must be the requirements files';
`python -c` code must compile; pytest's paths and markers must exist. A block without a marker,
with an unknown one, or with a command this file cannot check fails. `...` stands for elided
arguments and is dropped.

The cpu blocks run in the documents' order (DOCS; FIRST_TO_RUN before) in one folder where the
docs' names stand for small things (STAND_INS): `Llama-2-7b-hf` is a tiny random LLaMA with the
bundled tokenizer, `alpaca_data.json` the bundled instructions; a name the docs take from a GPU
step (the fine-tuned run, its answers) is made by the CPU preset of the same launch
(examples/finetune.sh, PRESET=cpu ITERS=2) just before the first block that reads it. Scripts run
at the small sizes their own documented variables give (SMALL). docs/development.md#runnable-docs
says the same for the docs' writers.
"""

import argparse
import contextlib
import glob
import importlib
import importlib.metadata
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The order a newcomer follows (later blocks read what earlier ones wrote); the rest after.
DOCS = ["README.md", "docs/data.md", "docs/checkpoints.md", "docs/training.md", "docs/evaluation.md",
        "docs/smollm2.md", "docs/method.md", "docs/architecture.md", "docs/development.md"]
# Run before the other cpu blocks: README's demo reuses docs/smollm2.md's conversion of the same model.
FIRST_TO_RUN = ["docs/smollm2.md"]
KINDS = ("cpu", "gpu", "cluster", "network", "ci")
SHELL_LANGUAGES = ("bash", "sh", "shell")
MARKER = re.compile(r"^<!--\s*runs-on:\s*(\S+)\s*-->\s*$")
# Commands with nothing of this project's to check.
PLAIN = {"echo", "export", "cd", "mkdir", "cat", "ls", "head", "tail", "cp", "rm", "source", "sbatch", "squeue"}


def documents():
    found = [os.path.join(REPO, name) for name in DOCS]
    for pattern in ("docs/*.md", "examples/**/README.md"):
        found += sorted(set(glob.glob(os.path.join(REPO, pattern), recursive=True)) - set(found))
    return found


class Block:
    def __init__(self, path, line, language, kind, text):
        self.path, self.line, self.language, self.kind, self.text = path, line, language, kind, text

    @property
    def where(self):
        return f"{os.path.relpath(self.path, REPO)}:{self.line}"


def blocks(path):
    """The fenced blocks of a Markdown file, each with the marker on the line before its fence."""
    lines = open(path, encoding="utf-8").read().split("\n")
    found, index = [], 0
    while index < len(lines):
        fence = re.match(r"^(\s*)(```+|~~~+)\s*(\S*)", lines[index])
        if not fence:
            index += 1
            continue
        start, close = index, fence.group(2)
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(close):
            index += 1
        marker = MARKER.match(lines[start - 1].strip()) if start else None
        body = [line[len(fence.group(1)):] for line in lines[start + 1:index]]
        found.append(Block(path, start + 1, fence.group(3).lower(), marker.group(1) if marker else None, "\n".join(body)))
        index += 1
    return found


ALL_BLOCKS = [block for path in documents() for block in blocks(path)]
SHELL_BLOCKS = [block for block in ALL_BLOCKS if block.language in SHELL_LANGUAGES]


def test_every_shell_block_says_where_it_runs():
    wrong = [f"{block.where}: {'no' if block.kind is None else 'unknown'} runs-on marker"
             for block in SHELL_BLOCKS if block.kind not in KINDS]
    wrong += [f"{block.where}: a runs-on marker on a ```{block.language or ' '} block (only shell blocks run)"
              for block in ALL_BLOCKS if block.kind is not None and block.language not in SHELL_LANGUAGES]
    assert not wrong, "\n".join(wrong)
    assert {"cpu", "gpu", "cluster"} <= {block.kind for block in SHELL_BLOCKS}  # the test has something to run and to parse


# ---- parsing -------------------------------------------------------------------------------------

def commands(text):
    """The block's simple commands as token lists (continuations joined, comments dropped, split at
    ; && || | and with redirections dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.split("\n"):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current, tokens = [], list(lexer)
        skip_next = False
        for token in tokens:
            if skip_next:
                skip_next = False
            elif token in (";", "&&", "||", "|", "&"):
                found.append(current) if current else None
                current = []
            elif token in (">", ">>", "<", "2>"):
                skip_next = True
            else:
                current.append(token)
        if current:
            found.append(current)
    return found


class _Parsed(BaseException):
    """Raised by the patched ArgumentParser.parse_args once the real parser has read the argv."""


def spelled_in_full(parser):
    """No abbreviated flags (argparse takes --max-new-token for --max-new-tokens): a doc spells each
    flag as its parser names it, so that a renamed flag cannot hide behind a prefix."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                spelled_in_full(sub)
    return parser


@contextlib.contextmanager
def stop_after_parsing(stop=True):
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        parsed = original(spelled_in_full(self), args, namespace)
        if stop:
            raise _Parsed()
        return parsed

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def parse_with(main, argv, what):
    """Run a command's main up to its parse of argv: its parser's error, if any."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), stop_after_parsing():
            main(argv)
    except _Parsed:
        return None
    except SystemExit as error:
        return f"{what}: {stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else error}"
    return f"{what}: ran past its parser"


def finetune_errors(argv, what, elided=False):
    """symnoise-finetune's flags and the --config files they name, as the job reads them, and the
    checks of its flags that read no file (a block with `...` elides some: parsing only)."""
    from symnoise_megatron.training.arguments import parse_config

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), stop_after_parsing(stop=False):
            config = parse_config(argv)
            if not elided:
                config.validate_flags()
    except SystemExit:
        return f"{what}: {stderr.getvalue().strip().splitlines()[-1]}"
    except (ValueError, OSError) as error:
        return f"{what}: {error}"
    return None


def console_script(name):
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == name] or [None]
    return entry.load() if entry else None


def check_program(tokens, what):
    """Errors of one program invocation: a symnoise command, a tools/ alias, a module."""
    program, argv = tokens[0], [token for token in tokens[1:] if token != "..."]
    if program == "symnoise-finetune":
        return finetune_errors(argv, what, elided="..." in tokens)
    if program.startswith("symnoise-"):
        main = console_script(program)
        return parse_with(main, argv, what) if main else f"{what}: no command {program}"
    if program.startswith("tools/") and program.endswith(".py"):
        if not os.path.isfile(os.path.join(REPO, program)):
            return f"{what}: no file {program}"
        module = importlib.import_module(program[:-3].replace("/", "."))
        return parse_with(module.main, argv, what)
    return f"{what}: cannot check {program!r}"


def check_python(tokens, what):
    rest = tokens[1:]
    if rest[:1] == ["-c"]:
        try:
            compile(rest[1], what, "exec")
        except SyntaxError as error:
            return f"{what}: {error}"
        return None
    if rest[:2] == ["-m", "pytest"]:
        missing = [path for path in rest[2:] if path.startswith("tests") and not os.path.exists(os.path.join(REPO, path))]
        markers = [word for index, token in enumerate(rest) if index and rest[index - 1] == "-m" and token != "pytest"
                   for word in re.findall(r"[a-z_]+", token) if word not in ("and", "or", "not")]
        missing += [f"marker {name}" for name in markers if name not in declared_markers()]
        return f"{what}: no {missing}" if missing else None
    if rest[:2] == ["-m", "symnoise_megatron.finetune"]:
        return finetune_errors([token for token in rest[2:] if token != "..."], what, elided="..." in rest)
    return check_program(rest, what)


def check_torchrun(tokens, what):
    from torch.distributed.run import get_args_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = spelled_in_full(get_args_parser()).parse_args(tokens[1:])
    except SystemExit:
        return f"{what}: torchrun: {stderr.getvalue().strip().splitlines()[-1]}"
    script = [args.training_script] + args.training_script_args
    if args.module:
        return check_python(["python", "-m"] + script, what)
    if args.no_python:
        return check_program(script, what)
    return check_python(["python"] + script, what)


def script_reads(script):
    """The text of a script and of the shell files beside it (what it sources, the jobs it submits)."""
    folder = os.path.dirname(script)
    files = {script} | {path for pattern in ("*.sh", "*.sbatch", "*.env") for path in glob.glob(os.path.join(folder, pattern))}
    if os.path.basename(folder) == "cluster":  # submit.sh's finetune step is examples/slurm_finetune.sbatch, which runs finetune.sh
        files |= set(glob.glob(os.path.join(os.path.dirname(folder), "*.s*")))
    return "\n".join(open(path, encoding="utf-8").read() for path in files)


def check_bash(tokens, variables, what):
    script = os.path.join(REPO, tokens[1])
    if not os.path.isfile(script):
        return f"{what}: no script {tokens[1]}"
    syntax = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    if syntax.returncode:
        return f"{what}: {syntax.stderr.strip()}"
    text = script_reads(script)
    unread = [name for name in variables if not re.search(r"\$\{?" + name + r"\b|\b" + name + r"=|\$\{" + name + r"[:\-+=?]", text)]
    if unread:
        return f"{what}: {tokens[1]} reads no {', '.join(unread)}"
    if tokens[1] == "examples/cluster/submit.sh" and not re.search(r"\b" + re.escape(tokens[2]) + r"\b[|)]", text):
        return f"{what}: submit.sh has no step {tokens[2]}"
    return None


def pinned():
    """name -> version of the requirements files' exact pins."""
    pins = {}
    for path in glob.glob(os.path.join(REPO, "requirements*.txt")):
        for line in open(path, encoding="utf-8"):
            match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
            if match:
                pins[match.group(1).lower()] = match.group(2)
    return pins


def check_pip(tokens, what):
    extras = set(importlib.metadata.metadata("symnoise-megatron").get_all("Provides-Extra") or [])
    wrong, pins = [], pinned()
    for token in tokens[2:]:
        match = re.match(r"^(?:\.|symnoise-megatron)\[([^\]]+)\]$", token)
        if match:
            wrong += [f"no extra {extra} (setup.py has {sorted(extras)})" for extra in match.group(1).split(",") if extra not in extras]
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", token)
        if match and pins.get(match.group(1).lower(), match.group(2)) != match.group(2):
            wrong.append(f"{token}, where the requirements pin {pins[match.group(1).lower()]}")
    return f"{what}: {'; '.join(wrong)}" if wrong else None


def declared_markers():
    text = open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8").read()
    return set(re.findall(r'^\s*"([a-z_]+):', text, re.MULTILINE))


def check_command(tokens, exported, what):
    variables = list(exported)
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
        variables.append(tokens.pop(0).split("=", 1)[0])
    if not tokens:
        return None
    program = tokens[0]
    if program == "export":
        exported.extend(token.split("=", 1)[0] for token in tokens[1:])
        return None
    if program == "bash":
        return check_bash(tokens, variables, what)
    if program in ("python", "python3", ".venv/bin/python"):
        return check_python(tokens, what)
    if program == "torchrun":
        return check_torchrun(tokens, what)
    if program == "pip":
        return check_pip(tokens, what)
    if program in PLAIN:
        return None
    return check_program(tokens, what)


def block_errors(block):
    exported, errors = [], []
    for tokens in commands(block.text):
        error = check_command(list(tokens), exported, f"{block.where} `{' '.join(tokens)[:80]}`")
        if error:
            errors.append(error)
    return errors


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda block: block.where)
def test_each_command_is_accepted_by_its_parser(block):
    errors = block_errors(block)
    assert not errors, "\n".join(errors)


def test_a_renamed_flag_is_caught():
    (block,) = [b for b in SHELL_BLOCKS if b.where.startswith("docs/checkpoints.md") and "symnoise-verify" in b.text][:1]
    broken = Block(block.path, block.line, block.language, block.kind,
                   block.text.replace("--tensor-model-parallel-size", "--tensor-parallel-size"))
    assert block_errors(block) == [] and any("--tensor-parallel-size" in error for error in block_errors(broken))
    config = Block(block.path, 1, "bash", "gpu", "symnoise-finetune --config examples/configs/alpaca.yaml --noise-alpha five")
    assert any("--noise-alpha" in error for error in block_errors(config))


# ---- running ---------------------------------------------------------------------------------------

def _tiny_llama(folder, run):
    run([sys.executable, os.path.join(REPO, "tools", "make_tiny_llama.py"), "--save-dir", "Llama-2-7b-hf",
         "--hidden-size", "64", "--num-layers", "2"])


def _bundled(folder, run):
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS

    shutil.copyfile(BUNDLED_INSTRUCTIONS, os.path.join(folder, "alpaca_data.json"))


def _fine_tuned(folder, run):
    # What docs/training.md's launch writes, by its CPU preset; from what data.md and checkpoints.md made.
    run(["bash", os.path.join(REPO, "examples", "finetune.sh")],
        env=dict(PRESET="cpu", ITERS="2", CKPT="ckpt/llama2-7b", DATA="data/alpaca", OUT="runs/llama2-7b-alpaca-symnoise"))


def _answers(folder, run):
    # From the run's export (docs/checkpoints.md's block made it): no conversion on the fly.
    run(["symnoise-generate", "--hf-dir", "hf/llama2-7b-alpaca-symnoise", "--prompts", "alpaca_data.json",
         "--limit", "2", "--max-new-tokens", "4", "--output", "outputs/symnoise.json", "--no-progress"])


def _converted_smollm2(folder, run):
    # The demo converts SmolLM2 unless its folder holds the conversion: docs/smollm2.md's block made
    # the same one (the same model, converted the same way), so it is converted once here.
    os.makedirs(os.path.join(folder, "cpu_demo"), exist_ok=True)
    os.symlink(os.path.join(folder, "ckpt", "smollm2"), os.path.join(folder, "cpu_demo", "smollm2-megatron"))


# The docs' names for what the CPU cannot make at their size, and how the test makes a small one.
STAND_INS = {"Llama-2-7b-hf": _tiny_llama, "alpaca_data.json": _bundled,
             "runs/llama2-7b-alpaca-symnoise": _fine_tuned, "outputs/symnoise.json": _answers}
# Made before a block that runs a script, when what they are made from exists.
BEFORE_SCRIPTS = {"examples/cpu_demo.sh": ("cpu_demo/smollm2-megatron", "ckpt/smollm2", _converted_smollm2)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("docs"))


# The small sizes the cpu blocks run at, through the variables their scripts document
# (examples/cpu_demo.sh: ITERS, NEW_TOKENS, and OUT to keep its output in the test's folder).
SMALL = {"ITERS": "2", "NEW_TOKENS": "4", "OUT": "cpu_demo"}


def environment(**more):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # This venv's commands first, and the scripts' `python` is this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return dict(env, **more)


CPU_BLOCKS = sorted((block for block in SHELL_BLOCKS if block.kind == "cpu"),
                    key=lambda block: os.path.relpath(block.path, REPO) not in FIRST_TO_RUN)


@pytest.mark.distributed  # runs torchrun and the commands' own processes
def test_the_cpu_blocks_run(folder):
    def run(command, env=None):
        started = time.monotonic()
        result = subprocess.run(command, cwd=folder, env=environment(**(env or {})), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        print(f"stand-in {' '.join(command)[:60]}: {time.monotonic() - started:.1f} s")

    assert CPU_BLOCKS
    for block in CPU_BLOCKS:
        for name, make in STAND_INS.items():
            if re.search(r"(?<![\w/.-])" + re.escape(name) + r"(?![\w.-])", block.text) and not os.path.exists(os.path.join(folder, name)):
                make(folder, run)
        for script, (name, source, make) in BEFORE_SCRIPTS.items():
            if script in block.text and os.path.exists(os.path.join(folder, source)) and not os.path.lexists(os.path.join(folder, name)):
                make(folder, run)
        # The scripts the docs call by their path in the checkout.
        script = f"cd {shlex.quote(folder)}\n" + block.text.replace("bash examples/", f"bash {REPO}/examples/")
        started = time.monotonic()
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder, env=environment(**SMALL),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{block.where} failed:\n{block.text}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        print(f"{block.where}: {time.monotonic() - started:.1f} s")
