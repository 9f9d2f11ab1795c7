"""The known third-party warnings are filtered where the package starts; every other stays visible.

Each check runs in a fresh interpreter: pytest replaces the warning filters around every test, and
the package must filter them by itself, in each process a command or torchrun starts.
"""

import subprocess
import sys
import textwrap

import pytest


def run_python(code: str) -> str:
    """What ``code`` prints on stderr in a fresh interpreter of this venv."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@pytest.mark.distributed  # its process imports torch and megatron-core
def test_importing_the_trainer_and_the_commands_prints_no_warning():
    # megatron-core's import-time warnings (Apex, Transformer Engine, 0.19's MimoModelConfig, the
    # CUDA torch build's missing CUDA runtime) under whichever release this leg installs.
    stderr = run_python("""
        import symnoise_megatron.training.loop, symnoise_megatron.checkpoint.convert
        import symnoise_megatron.evaluation.generate, symnoise_megatron.model.builder
        import megatron.core.models.gpt.gpt_layer_specs, megatron.core.optimizer
    """)
    assert stderr == ""


def test_a_known_warning_is_filtered_and_an_unknown_one_is_not():
    stderr = run_python("""
        import warnings
        import symnoise_megatron

        def from_module(message, category, module):
            warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", 1, module=module)

        from_module("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends")
        from_module("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
                    "torch.distributed._shard.sharded_tensor.api")
        # Unknown: another message from the same module, the known message from another package, the
        # known message in another category.
        from_module("Apex is too old", UserWarning, "megatron.core.models.backends")
        from_module("Apex is not installed. Falling back to Torch Norm", UserWarning, "some_other_package")
        from_module("Apex is not installed. Falling back to Torch Norm", RuntimeWarning, "megatron.core.models.backends")
    """)
    assert "Apex is too old" in stderr
    assert "some_other_package.py:1: UserWarning: Apex is not installed" in stderr
    assert "RuntimeWarning: Apex is not installed" in stderr
    assert stderr.count("UserWarning: Apex is not installed") == 1  # some_other_package's only
    assert "ShardedTensor" not in stderr


def test_a_known_log_record_is_dropped_and_others_of_its_logger_are_not():
    stderr = run_python("""
        import logging
        import symnoise_megatron

        logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
        logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
        logger.warning("GPTModel is about to run out of memory")
        logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").warning(
            "MCore's async save is deprecated and will be removed in the future releases.")
        logging.getLogger("some.other.logger").warning("GPTModel IS DEPRECATED (someone else's words)")
    """)
    assert stderr.splitlines() == ["GPTModel is about to run out of memory", "GPTModel IS DEPRECATED (someone else's words)"]


@pytest.mark.distributed
def test_a_save_and_a_load_print_no_warning(tmp_path):
    # The checkpoint path's warnings (ShardedTensor, load_state_dict, the single-process read, 0.19's
    # async-save notice) come at the first save and load of a process, not at import.
    stderr = run_python(f"""
        import os
        import symnoise_megatron
        import torch, torch.distributed as dist
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from symnoise_megatron.checkpoint.paths import save_atomically
        from symnoise_megatron.common import megatron_versions
        from symnoise_megatron.runtime.cpu import cpu_runtime

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        state = {{"w": ShardedTensor.from_rank_offsets("w", torch.arange(6.0), replica_id=0), "iteration": 3}}
        request = {{"w": ShardedTensor.from_rank_offsets("w", torch.zeros(6), replica_id=0)}}
        with cpu_runtime():
            directory = save_atomically({str(tmp_path)!r}, 3, state, {{}})
            loaded = megatron_versions.load(request, directory)
        assert loaded["w"].tolist() == list(range(6)) and loaded["iteration"] == 3
        assert megatron_versions.load_common_state_dict(directory)["iteration"] == 3
        dist.destroy_process_group()
    """)
    assert stderr == ""
