"""``python -m symnoise_megatron.finetune`` with a pause after each iteration, for tests that
must act on a job while it trains (a tiny model trains 16 iterations in a second).

PACE_SECONDS: the pause; it ends early once SIGTERM or the stop file asked the run to stop, so
the save and exit are what they would be. A requeued attempt (SLURM_RESTART_COUNT >= 1) runs unpaced.
Only the timing changes: the losses are those of the plain entry point.
"""

import os
import sys
import time

from symnoise_megatron import finetune
from symnoise_megatron.training import loop


def main():
    pace = float(os.environ.get("PACE_SECONDS", "0"))
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) >= 1:
        pace = 0.0
    train_step = loop.Trainer.train_step

    def paced_train_step(self):
        result = train_step(self)
        resume_at = time.time() + pace
        stop_file = self.stop.stop_file
        while time.time() < resume_at and not (self.stop.stop_requested or stop_file and os.path.exists(stop_file)):
            time.sleep(0.05)
        return result

    loop.Trainer.train_step = paced_train_step
    return finetune.main()


if __name__ == "__main__":
    sys.exit(main())
