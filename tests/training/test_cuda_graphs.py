"""Transformer Engine's CUDA graph capture as Megatron-LM's loop drives it (the capture itself
needs a GPU: the GPU plan's step bench runs it; here its contract with megatron-core's helper)."""

from symnoise_megatron.training.arguments import TrainingConfig
from symnoise_megatron.training.cuda_graphs import CudaGraphCapture


class Chunk:
    def __init__(self, calls):
        self.calls = calls

    def disable_forward_pre_hook(self, param_sync=True):
        self.calls.append(("disable", param_sync))

    def enable_forward_pre_hook(self):
        self.calls.append(("enable",))


def recording_helper(calls):
    class Helper:
        def __init__(self, **kwargs):
            calls.append(("helper", kwargs["seq_length"], kwargs["micro_batch_size"], len(kwargs["optimizers"])))
            self.created = False

        def graphs_created(self):
            return self.created

        def create_cudagraphs(self):
            calls.append(("capture",))
            self.created = True

        def cuda_graph_set_manual_hooks(self):
            calls.append(("manual hooks",))

    return Helper


def capture_calls(steps, settle=False, **flags):
    from megatron.core.num_microbatches_calculator import get_num_microbatches, unset_num_microbatches_calculator

    calls = []
    config = TrainingConfig.from_flags(data_path=["unused"], train_iters=1, cuda_graph_impl="transformer_engine", **flags)
    capture = CudaGraphCapture(config, None, [Chunk(calls)], "optimizer", 2048, 2, microbatches=6, data_parallel_size=4,
                               helper_class=recording_helper(calls))
    counted = get_num_microbatches()
    for _ in range(steps):
        calls.append(("step",))
        capture.before_step(settle=(lambda: calls.append(("settle",))) if settle else None)
    unset_num_microbatches_calculator()
    return calls, counted


def test_graphs_are_captured_once_after_the_warm_up_steps_with_the_steps_micro_batch_count():
    calls, counted = capture_calls(5, cuda_graph_warmup_steps=2)
    assert counted == 6  # megatron-core's calculator holds this rank's micro-batches of a step
    assert calls == [("helper", 2048, 2, 1), ("step",), ("step",), ("step",), ("capture",), ("step",), ("step",)]


def test_with_the_overlapped_parameter_gather_the_pre_hooks_become_manual_hooks():
    calls, _ = capture_calls(3, cuda_graph_warmup_steps=1, use_distributed_optimizer=True, overlap_grad_reduce=True,
                             overlap_param_gather=True)
    assert calls[2:] == [("step",), ("disable", False), ("capture",), ("enable",), ("manual hooks",), ("step",)]


def test_nothing_is_captured_without_transformer_engine_graphs():
    config = TrainingConfig.from_flags(data_path=["unused"], train_iters=1, cuda_graph_impl="local")
    capture = CudaGraphCapture(config, None, [], None, 2048, 1, 4, 1, helper_class=lambda **k: 1 / 0)
    for _ in range(5):
        capture.before_step()
    assert capture.helper is None


def test_the_batches_built_in_the_background_are_finished_before_the_capture():
    """A capture fails on CUDA calls from other threads (the prefetcher's pinned allocations):
    the build in flight is waited for first, only at the capturing step."""
    calls, _ = capture_calls(4, settle=True, cuda_graph_warmup_steps=2)
    assert calls[1:] == [("step",), ("step",), ("step",), ("settle",), ("capture",), ("step",)]
