"""Processes on this machine."""

from __future__ import annotations

import errno
import os


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one of another user's counts too)."""
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM
    return True
