"""--save's lock where the file system refuses flock: a lock file made with an exclusive create.

Some Lustre mounts (``noflock``: ENOSYS) and NFS mounts without a lock manager (ENOLCK) refuse
``flock``, which ``checkpointing.SaveLock`` uses. There the lock is the existence of
``<save>/symnoise_save.held``, created with ``O_CREAT | O_EXCL`` (atomic on local file systems,
NFSv3+ and Lustre) and holding the run's host, PID, the process's start time and its SLURM job.
Unlike a flock, nothing drops it when the run dies, so a lock file left behind is judged:

- same host: the holder is gone when no process has its PID, or one has but started at another
  time (the PID was reused);
- another host: the holder is gone only when it was an earlier attempt of this same SLURM job
  (SLURM requeues a job once its earlier attempt has ended or its node was declared down);
  otherwise the run is refused, and the message says to delete the file once that run is
  known to be gone (this host cannot see another host's processes).

A lock judged stale is taken over with a warning naming the run that left it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid
from typing import Optional

from symnoise_megatron.common.processes import pid_alive
from symnoise_megatron.training.checkpointing import SaveLock

HELD = "symnoise_save.held"
# What flock raises where the file system does not do it (rather than "held by another").
FLOCK_REFUSED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
# A lock file without a readable record is being written, unless it is older than this.
UNREADABLE_GRACE_S = 60.0


def take_save_lock(root: str, log=print):
    """--save's lock: a flock (``SaveLock``), or this module's lock file where flock is refused."""
    try:
        return SaveLock(root, log)
    except OSError as error:
        if error.errno not in FLOCK_REFUSED:
            raise ValueError(f"--save {root}: cannot lock it ({error.strerror})") from None
        log(f"note: the file system of --save {root} refuses flock ({error.strerror}): "
            f"locking it with the lock file {os.path.join(root, HELD)} instead")
        return ExclusiveLockFile(root, log)


def process_start_ticks(pid: int) -> Optional[int]:
    """When process ``pid`` started, in clock ticks since boot (/proc/PID/stat's 22nd field); None
    where there is no such process or no /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2:].split()[19])  # fields after the command name, which may hold spaces


def _this_run() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": process_start_ticks(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "token": uuid.uuid4().hex}


def describe(record: dict) -> str:
    job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}{job}"


def why_gone(record: dict) -> Optional[str]:
    """Why the run that wrote ``record`` cannot be holding the lock any more, or None if it may be."""
    here = _this_run()
    if record.get("host") == here["host"]:
        pid = int(record.get("pid") or 0)
        if not pid or not pid_alive(pid):
            return "no longer running"
        if record.get("start_ticks") is not None and process_start_ticks(pid) not in (None, record["start_ticks"]):
            return "no longer running (its PID now belongs to another process)"
        return None
    if record.get("slurm_job_id") and record["slurm_job_id"] == here["slurm_job_id"]:
        return "an earlier attempt of this SLURM job, which SLURM ended before starting this one"
    return None


class ExclusiveLockFile:
    """``<root>/symnoise_save.held``, created exclusively; removed by ``release`` (also at garbage collection)."""

    def __init__(self, root: str, log=print):
        self.root, self.path, self.record = root, os.path.join(root, HELD), None
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as error:
            raise ValueError(f"--save {root} is not writable ({error.strerror}: {error.filename})") from None
        mine = _this_run()
        if self._create(mine):
            return
        text, age = self._read()
        record = self._parse(text)
        if record is None and age < UNREADABLE_GRACE_S:
            raise ValueError(f"--save {root} is being locked by another run right now (lock file {self.path}); "
                             "stop that run or give this one another --save")
        gone = "its record is unreadable" if record is None else why_gone(record)
        if gone is None:
            raise ValueError(
                f"--save {root} is in use by another run ({describe(record)}; lock file {self.path}); stop that run or "
                "give this one another --save. If that run is gone (a node that died), delete the lock file")
        if not self._take_over(text) or not self._create(mine):
            raise ValueError(f"--save {root}: another run took the lock file {self.path} at the same time")
        holder = "a run" if record is None else f"a run that is gone ({describe(record)}: {gone})"
        log(f"WARNING: taking over the lock of {holder} in {self.path}")

    def _create(self, record: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as error:
            raise ValueError(f"--save {self.root} is not writable ({error.strerror}: {self.path})") from None
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.record = record
        return True

    def _read(self):
        """(the lock file's text, its age in seconds); ("", 0) if it vanished meanwhile."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                return handle.read(), time.time() - os.fstat(handle.fileno()).st_mtime
        except FileNotFoundError:
            return "", 0.0

    @staticmethod
    def _parse(text: str) -> Optional[dict]:
        try:
            record = json.loads(text)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def _take_over(self, stale_text: str) -> bool:
        """Move the stale lock file aside, if it still is the one judged; False if another run got there first.

        Renaming is atomic: of several runs taking over at once, one moves the file. The moved file's
        text is compared with the one judged stale, and a live lock moved by mistake is put back."""
        aside = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # already gone: the exclusive create decides
        with open(aside, encoding="utf-8", errors="replace") as handle:
            moved = handle.read()
        if moved == stale_text:
            os.remove(aside)
            return True
        try:
            os.link(aside, self.path)  # put the live lock back, unless another exists by now
        except FileExistsError:
            pass
        os.remove(aside)
        return False

    def release(self) -> None:
        """Remove the lock file if it is still this run's."""
        if getattr(self, "record", None) is None:
            return
        text, _ = self._read()
        record = self._parse(text)
        if record is not None and record.get("token") == self.record["token"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.record = None

    def __del__(self):
        try:
            self.release()
        except Exception:  # at interpreter exit, module globals may be gone: the file stays, judged stale later
            pass
