"""--save's lock where flock is refused: the exclusive-create lock file, its stale-lock rules, and
the fine-tune's lock falling back to it (fcntl.flock made to fail as a Lustre or NFS mount does)."""

import errno
import fcntl
import json
import os
import socket
import subprocess
import time

import pytest

from symnoise_megatron.training.lock_file import HELD, ExclusiveLockFile, process_start_ticks, take_save_lock
from tests.distributed import run_distributed


def refuse_flock(monkeypatch, code=errno.ENOLCK):
    def refused(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", refused)


def write_record(root, **record):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, HELD), "w") as handle:
        json.dump(record, handle)


def test_refused_flock_falls_back_to_a_lock_file_that_excludes_a_second_run(tmp_path, monkeypatch):
    refuse_flock(monkeypatch)
    save, notes = str(tmp_path / "run"), []
    lock = take_save_lock(save, log=notes.append)
    assert isinstance(lock, ExclusiveLockFile)
    assert "refuses flock" in notes[0] and HELD in notes[0]
    with open(os.path.join(save, HELD)) as handle:
        record = json.load(handle)
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
    assert record["start_ticks"] == process_start_ticks(os.getpid()) and record["started"]
    # This process is alive and started when the record says: the lock is held.
    with pytest.raises(ValueError, match=rf"--save {save} is in use by another run \(pid {os.getpid()} on "
                                         rf"{socket.gethostname()}, started .*; lock file .*{HELD}\)"):
        take_save_lock(save)
    lock.release()
    assert not os.path.exists(os.path.join(save, HELD))
    take_save_lock(save).release()


def test_a_lock_left_by_a_dead_process_or_a_reused_pid_is_taken_over_naming_it(tmp_path, monkeypatch):
    refuse_flock(monkeypatch, errno.ENOSYS)  # Lustre mounted with noflock
    holder = subprocess.Popen(["sleep", "60"])
    ticks = process_start_ticks(holder.pid)
    here = socket.gethostname()
    dead, reused = str(tmp_path / "dead"), str(tmp_path / "reused")
    write_record(dead, host=here, pid=holder.pid, start_ticks=ticks, started="2026-01-01T00:00:00")
    with pytest.raises(ValueError, match=f"pid {holder.pid} on {here}"):
        take_save_lock(dead)  # alive: held
    holder.kill()
    holder.wait()
    warnings = []
    lock = take_save_lock(dead, log=warnings.append)
    assert f"taking over the lock of a run that is gone (pid {holder.pid} on {here}, started 2026-01-01T00:00:00: " \
           f"no longer running)" in warnings[-1]
    with open(os.path.join(dead, HELD)) as handle:
        assert json.load(handle)["pid"] == os.getpid()
    lock.release()
    # A live PID that started at another time than the record says is another process now.
    write_record(reused, host=here, pid=os.getpid(), start_ticks=process_start_ticks(os.getpid()) - 1, started="x")
    take_save_lock(reused, log=warnings.append).release()
    assert "its PID now belongs to another process" in warnings[-1]


def test_another_hosts_lock_is_refused_unless_it_is_an_earlier_attempt_of_this_slurm_job(tmp_path, monkeypatch):
    refuse_flock(monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    other, requeued = str(tmp_path / "other"), str(tmp_path / "requeued")
    write_record(other, host="node-that-died", pid=1, started="x", slurm_job_id="17")
    with pytest.raises(ValueError, match=r"pid 1 on node-that-died, started x, SLURM job 17; .*delete the lock file"):
        take_save_lock(other)
    assert os.path.exists(os.path.join(other, HELD))
    write_record(requeued, host="node-that-died", pid=1, started="x", slurm_job_id="4242")
    warnings = []
    take_save_lock(requeued, log=warnings.append).release()
    assert "(pid 1 on node-that-died, started x, SLURM job 4242: an earlier attempt of this SLURM job" in warnings[-1]


def test_an_unreadable_lock_file_is_refused_while_fresh_and_taken_over_once_old(tmp_path, monkeypatch):
    refuse_flock(monkeypatch)
    save = str(tmp_path / "run")
    os.makedirs(save)
    path = os.path.join(save, HELD)
    open(path, "w").close()  # created, its record not yet written
    with pytest.raises(ValueError, match="is being locked by another run right now"):
        take_save_lock(save)
    os.utime(path, (time.time() - 120, time.time() - 120))
    warnings = []
    take_save_lock(save, log=warnings.append).release()
    assert "taking over the lock of a run" in warnings[-1]


def test_a_takeover_puts_back_a_lock_that_changed_after_it_was_judged(tmp_path, monkeypatch):
    # Two runs judge the same stale file; the first takes over and writes its record; the second's
    # rename then moves the live lock, sees it is not the file it judged, and puts it back.
    refuse_flock(monkeypatch)
    save = str(tmp_path / "run")
    first = take_save_lock(save)
    with open(os.path.join(save, HELD)) as handle:
        live = handle.read()
    late = ExclusiveLockFile.__new__(ExclusiveLockFile)
    late.root, late.path, late.record = save, os.path.join(save, HELD), None
    assert late._take_over('{"pid": 1, "host": "stale"}') is False
    with open(os.path.join(save, HELD)) as handle:
        assert handle.read() == live
    assert not [name for name in os.listdir(save) if ".stale." in name]
    first.release()


def test_other_flock_errors_are_one_line(tmp_path, monkeypatch):
    refuse_flock(monkeypatch, errno.EIO)
    with pytest.raises(ValueError, match=r"--save .*: cannot lock it \(Input/output error\)"):
        take_save_lock(str(tmp_path / "run"))


def lock_twice_without_flock(save):
    """The fine-tune's lock (resume.acquire_save_lock) on a file system that refuses flock."""
    from symnoise_megatron.training.resume import acquire_save_lock

    def refused(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    fcntl.flock = refused
    notes = []
    first = acquire_save_lock(save, notes.append)
    try:
        acquire_save_lock(save, notes.append)
    except ValueError as error:
        notes.append(str(error))
    first.release()
    return notes, os.path.exists(os.path.join(save, HELD))


@pytest.mark.distributed
def test_the_fine_tunes_lock_falls_back_when_flock_is_refused(tmp_path):
    notes, left = run_distributed(lock_twice_without_flock, 1, str(tmp_path / "run"))[0]
    assert "refuses flock (No locks available)" in notes[0]
    assert notes[-1].startswith(f"--save {tmp_path / 'run'} is in use by another run (pid ")
    assert not left
