"""The trainer's parts on their own: the stop conditions and the metrics sink's window."""

import pytest

from tests.distributed import run_distributed


def stop_reasons_and_window():
    import os
    import signal
    import time

    import torch

    from symnoise_megatron.model.config import preset
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.metrics_sink import MetricsSink
    from symnoise_megatron.training.stopping import StopConditions

    config = TrainingConfig.from_flags(data_path=["x"], train_iters=10, exit_interval=3, log_interval=4)
    stop = StopConditions(config.checkpoint, torch.device("cpu"))
    stop.arm()
    reasons = [stop.reason(iteration) for iteration in (1, 2, 3)]
    os.kill(os.getpid(), signal.SIGTERM)
    reasons.append(stop.reason(4))
    late = StopConditions(TrainingConfig.from_flags(exit_duration_in_mins=1e-6).checkpoint, torch.device("cpu"))
    late.arm()
    time.sleep(0.01)
    reasons.append(late.reason(1))

    messages = []
    sink = MetricsSink(config, preset("tiny"), messages.append)
    sink.start()
    sink.count_step(1, 100)
    with sink.paused():
        time.sleep(0.3)
    elapsed = time.time() - sink.window_start
    due = [sink.log_due(10)]
    sink.count_step(4, 100)
    due.append(sink.log_due(10))
    sink.validation(1.5)
    return reasons, elapsed, due, sink.window_tokens, messages


@pytest.mark.distributed
def test_stop_conditions_and_the_throughput_window():
    reasons, elapsed, due, tokens, messages = run_distributed(stop_reasons_and_window, 1)[0]
    assert reasons == [None, None, "exit condition", "SIGTERM", "exit condition"]
    assert elapsed < 0.25  # the paused (validation) time is not in the window
    assert due == [False, True] and tokens == 200
    assert messages == [" validation loss at iteration 4 | lm loss value: 1.500000E+00 |"]
