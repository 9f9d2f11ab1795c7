"""When a run stops before --train-iters: SIGTERM, --stop-file, the torchrun agent gone,
--exit-interval, --exit-duration-in-mins. Every rank stops at the same iteration."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from symnoise_megatron.training.arguments import CheckpointOptions


class StopConditions:
    def __init__(self, options: CheckpointOptions, device: torch.device):
        self.exit_interval = options.exit_interval
        self.exit_duration_in_mins = options.exit_duration_in_mins
        self.device = device
        self.stop_file = options.stop_file
        self.stop_file_seen = False
        self.stop_requested = False
        # torchrun starts each worker in its own session: a kill -9 of torchrun alone reaches no
        # worker. A worker sees it as a new parent process and stops (saving, as on SIGTERM).
        self.agent = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None
        self.agent_gone = False
        self.started = time.time()

    def arm(self) -> None:
        """At the start of training: SIGTERM asks for a stop, and the exit duration starts."""
        def request_stop(signum, frame):
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        self.started = time.time()

    def reason(self, iteration: int) -> Optional[str]:
        """Why the run stops after ``iteration`` (None: it goes on). A collective: every rank calls it."""
        asked = self._asked_on_any_rank()
        if asked:
            if self.stop_file_seen:
                return f"stop file {self.stop_file}"
            return "the torchrun agent is gone" if self.agent_gone else "SIGTERM"
        out_of_time = self.exit_duration_in_mins and (time.time() - self.started) / 60 >= self.exit_duration_in_mins
        if out_of_time or (self.exit_interval and iteration % self.exit_interval == 0):
            return "exit condition"
        return None

    def _stop_file_appeared(self) -> bool:
        """Rank 0 only (one stat an iteration): whether --stop-file exists; it is removed, so that a
        requeued or resubmitted run does not stop at once."""
        if not self.stop_file or dist.get_rank() != 0 or not os.path.exists(self.stop_file):
            return False
        try:
            os.remove(self.stop_file)
        except FileNotFoundError:
            pass
        return True

    def _asked_on_any_rank(self) -> bool:
        if self._stop_file_appeared():
            self.stop_file_seen = self.stop_requested = True
        if self.agent is not None and os.getppid() != self.agent and not self.agent_gone:
            self.agent_gone = self.stop_requested = True
            print(f"rank {dist.get_rank()}: the torchrun agent (pid {self.agent}) is gone; saving and stopping",
                  file=sys.stderr, flush=True)
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
