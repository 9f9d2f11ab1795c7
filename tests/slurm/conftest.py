"""The emulated two-node SLURM cluster and what the batch jobs train on (tests marked ``slurm``).

The fixture installs nothing: CI's .ci/run installs slurm-wlm and munge with apt; without
them (or without root) these tests are skipped with the reason.
"""

import os
import sys

import pytest

from tests.slurm.cluster import SlurmCluster, why_not_available

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.distributed)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = why_not_available()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _convert(hf_dir, megatron_dir):
    from symnoise_megatron.checkpoint.convert import hf_to_megatron

    hf_to_megatron(hf_dir, megatron_dir, progress=False)


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory):
    """(CKPT, DATA): a tiny LLaMA for the bundled tokenizer, converted, and the bundled
    instructions preprocessed, as the cpu preset (examples/configs/layouts/cpu.yaml) expects them."""
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS, BUNDLED_TOKENIZER
    from symnoise_megatron.data.preprocess import PreprocessConfig, preprocess
    from symnoise_megatron.data.tokenizer import TokenizerSpec
    from tests.checkpoint.conftest import make_hf_model
    from tests.distributed import run_distributed

    root = tmp_path_factory.mktemp("tiny_slurm")
    hf_dir = make_hf_model("llama", dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                         num_hidden_layers=2, max_position_embeddings=256), str(root / "hf"))
    run_distributed(_convert, 1, hf_dir, str(root / "megatron"))
    prefix = str(root / "data" / "bundled")
    preprocess(PreprocessConfig([BUNDLED_INSTRUCTIONS], prefix, TokenizerSpec(model_file=BUNDLED_TOKENIZER),
                                seq_length=129, progress=False))
    return str(root / "megatron"), prefix


@pytest.fixture(scope="session")
def submit_env(slurm):
    """The environment a user submits from: this Python's torchrun and console scripts first on
    PATH, the repository importable, the cluster's configuration, and cluster settings
    (examples/cluster/settings.env) for this small cluster: jobs share its nodes, a CPU each."""
    return dict(slurm.env, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                EXCLUSIVE="0", CPUS_PER_NODE="1", MEM_PER_NODE="500M")


@pytest.fixture(scope="session")
def job_env(submit_env, tiny_run_inputs):
    """``submit_env`` with the CPU preset and its inputs."""
    ckpt, data = tiny_run_inputs
    return dict(submit_env, PRESET="cpu", CKPT=ckpt, DATA=data)
