#!/usr/bin/env python
"""Plausible one-line bugs, each applied to a copy of the repository: does the suite catch it?

  python tools/dev/mutants.py                 # every mutation: a table of caught / SURVIVED, in minutes
  python tools/dev/mutants.py --only sign_lost --only mask_shifted
  python tools/dev/mutants.py --check         # only that every snippet still applies (what CI runs)

Each mutation names one source snippet that must occur exactly once in its file, its
replacement, and the tests that should catch it. For each, the tracked and untracked (not
ignored) files are copied to a temporary directory, the snippet is replaced there, and
``pytest -x`` runs those tests in the copy (the copy's package first on the path, checked).
A mutation is caught when pytest reports a failure; a snippet that is no longer in the source
is an error naming the mutation, so that a refactoring updates this list instead of it rotting.
Before the mutations, the same tests run once on the unchanged copy (``--no-baseline`` skips
it): a suite that fails anyway catches nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORACLE = "tests/training/test_oracle_step.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str          # relative to the repository root
    snippet: str       # must occur exactly once in the file
    replacement: str
    tests: Tuple[str, ...]  # pytest arguments: the tests that must catch it, fastest first
    bug: str           # what the bug would do to a user

    def apply(self, source: str) -> str:
        count = source.count(self.snippet)
        if count != 1:
            raise SnippetError(f"mutation {self.name}: {self.path} contains the snippet {self.snippet!r} {count} times "
                               "(expected once); update tools/dev/mutants.py to the current source")
        return source.replace(self.snippet, self.replacement)


class SnippetError(ValueError):
    pass


MUTATIONS: Tuple[Mutation, ...] = (
    Mutation("sign_lost", "symnoise_megatron/data/microbatch.py",
             "return dataclasses.replace(self, sign=sign)", "return dataclasses.replace(self, sign=1)",
             (ORACLE + "::test_tiny_llama_step_equals_transformers",),
             "the symmetric pair loses its sign: both copies get X + s*eps"),
    Mutation("loss_per_microbatch", "symnoise_megatron/model/builder.py",
             "calculate_per_token_loss=True,", "calculate_per_token_loss=False,",
             (ORACLE + "::test_tiny_llama_step_equals_transformers",),
             "the loss averaged per micro-batch instead of over the global batch's loss tokens"),
    Mutation("mask_shifted", "symnoise_megatron/data/sft_dataset.py",
             "return tokens[:-1], tokens[1:], mask[1:]", "return tokens[:-1], tokens[1:], mask[:-1]",
             ("tests/data/test_templates.py", ORACLE),
             "the loss mask one position off: the first token of the next user turn is trained"),
    Mutation("validation_noised", "symnoise_megatron/training/loop.py",
             "chunk.eval()", "chunk.train()",
             (ORACLE + "::test_validation_loss_is_a_noise_free_forward_of_the_held_out_samples",),
             "validation runs with the embedding noise"),
    Mutation("embedding_detached", "symnoise_megatron/noise/embedding.py",
             "noised = rows_first + noise.to(output.device)", "noised = rows_first.detach() + noise.to(output.device)",
             (ORACLE + "::test_tiny_llama_step_equals_transformers",),
             "the embedding output detached before the noise: the embedding no longer trains through its input"),
    Mutation("padding_noised", "symnoise_megatron/noise/embedding_noise.py",
             "real = (positions >= 0) & (positions < lengths)", "real = positions >= 0",
             ("tests/noise/test_embedding_noise.py", "tests/noise/test_embedding_distributed.py"),
             "the noise added to padding"),
    # alpha / sqrt(L * d / tp) where alpha / sqrt(L * d) is meant: the noise sqrt(tp) times too
    # large under tensor parallelism (the width stays d, so nothing fails on a shape).
    Mutation("scale_of_the_shard", "symnoise_megatron/noise/embedding.py",
             "noised = rows_first + noise.to(output.device)",
             "noised = rows_first + noise.to(output.device) * (self.embedding_dim / (self.embedding_dim // "
             "self.tp_group.size())) ** 0.5",
             (ORACLE + "::test_tiny_llama_step_equals_transformers", "tests/noise/test_embedding_distributed.py"),
             "the noise scale computed with the tensor-parallel shard's hidden size instead of d"),
)


def check_snippets(mutations: Sequence[Mutation] = MUTATIONS, root: str = ROOT) -> List[str]:
    """The mutated source of each mutation, after checking that its snippet applies once and the
    result still compiles. Raises SnippetError naming the first mutation that no longer applies."""
    out = []
    for mutation in mutations:
        with open(os.path.join(root, mutation.path), encoding="utf-8") as handle:
            mutated = mutation.apply(handle.read())
        compile(mutated, mutation.path, "exec")
        for test in mutation.tests:
            if not os.path.exists(os.path.join(root, test.split("::")[0])):
                raise SnippetError(f"mutation {mutation.name}: its test {test} does not exist")
        out.append(mutated)
    return out


def repository_files(root: str) -> List[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            check=True, capture_output=True).stdout.decode()
    return [path for path in listed.split("\0") if path and os.path.isfile(os.path.join(root, path))]


def copy_repository(root: str, target: str) -> None:
    for path in repository_files(root):
        destination = os.path.join(target, path)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        shutil.copy2(os.path.join(root, path), destination)


def copy_environment(copy: str) -> dict:
    return dict(os.environ, PYTHONPATH=copy + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONDONTWRITEBYTECODE="1")


def check_imports_from(copy: str) -> None:
    """The copy's package is the one the tests import (not the editable install of ``ROOT``)."""
    found = subprocess.run([sys.executable, "-c", "import symnoise_megatron; print(symnoise_megatron.__file__)"],
                           cwd=copy, env=copy_environment(copy), check=True, capture_output=True, text=True).stdout.strip()
    if not found.startswith(copy):
        raise RuntimeError(f"the copy imports symnoise_megatron from {found}, not from {copy}")


def run_tests(copy: str, tests: Sequence[str], log_path: str) -> Tuple[int, float]:
    """pytest -x on ``tests`` in ``copy``: (exit code, minutes)."""
    started = time.time()
    with open(log_path, "w") as log:
        code = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=copy,
                              env=copy_environment(copy), stdout=log, stderr=subprocess.STDOUT).returncode
    return code, (time.time() - started) / 60


def verdict(code: int) -> str:
    # pytest: 0 all passed, 1 some failed; anything else is no verdict (interrupted, usage, no tests).
    return {0: "SURVIVED", 1: "caught"}.get(code, f"error (pytest exit {code})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=[m.name for m in MUTATIONS],
                        help="run this mutation only (repeatable; default: all)")
    parser.add_argument("--check", action="store_true", help="only check that every snippet applies; run no test")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unchanged copy")
    parser.add_argument("--logs", default=None, help="folder for each run's pytest output (default: a temporary one)")
    args = parser.parse_args(argv)
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]
    try:
        check_snippets(selected)
    except SnippetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(selected)} mutations apply to the current source")
        return 0
    logs = args.logs or tempfile.mkdtemp(prefix="mutants_logs_")
    os.makedirs(logs, exist_ok=True)
    rows, survived = [], 0
    with tempfile.TemporaryDirectory(prefix="mutants_") as work:
        copy = os.path.join(work, "repo")
        copy_repository(ROOT, copy)
        check_imports_from(copy)
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in selected for t in m.tests))
            code, minutes = run_tests(copy, tests, os.path.join(logs, "baseline.log"))
            print(f"baseline (no mutation): pytest exit {code} in {minutes:.1f} min", flush=True)
            if code != 0:
                print(f"error: the tests fail without any mutation; see {logs}/baseline.log", file=sys.stderr)
                return 1
        for mutation in selected:
            path = os.path.join(copy, mutation.path)
            with open(path, encoding="utf-8") as handle:
                original = handle.read()
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(mutation.apply(original))
            try:
                code, minutes = run_tests(copy, mutation.tests, os.path.join(logs, f"{mutation.name}.log"))
            finally:
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(original)
            survived += code != 1
            rows.append((mutation.name, verdict(code), f"{minutes:.1f}", mutation.bug))
            print(f"{mutation.name}: {verdict(code)} in {minutes:.1f} min", flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutation':<{width}}  {'verdict':<10}  min  bug")
    for name, result, minutes, bug in rows:
        print(f"{name:<{width}}  {result:<10}  {minutes:>4}  {bug}")
    print(f"\n{len(rows) - survived} of {len(rows)} caught; pytest output in {logs}")
    return 0 if survived == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
