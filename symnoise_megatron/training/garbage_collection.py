"""Megatron-LM's --manual-gc: Python's garbage collector at fixed points of the loop.

A generational collection can take a rank tens of milliseconds at a moment of its own choosing;
in a job of hundreds of ranks every step then waits for whichever rank collected. With
--manual-gc the collector is switched off and every rank collects at the same points: once at
the start, before and after each validation, and every --manual-gc-interval iterations.
"""

from __future__ import annotations

import contextlib
import gc


class ManualGC:
    """``options``: the run's PerformanceOptions. Inert without --manual-gc."""

    def __init__(self, options):
        self.enabled, self.interval = options.manual_gc, options.manual_gc_interval
        self._was_enabled = None

    def start(self) -> None:
        if self.enabled and self._was_enabled is None:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()

    def after_iteration(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def around_validation(self):
        """As Megatron-LM: everything before validation, the objects it made after."""
        if self.enabled:
            gc.collect()
        try:
            yield
        finally:
            if self.enabled:
                gc.collect(generation=0)

    def stop(self) -> None:
        """Give the process its collector back (a test or a caller may run more after the loop)."""
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None
