"""The shared helpers: file hashes, atomic JSON, live processes."""

import hashlib
import json
import os
import subprocess

import pytest

from symnoise_megatron.common.files import HASH_CHUNK_BYTES, sha256_of_file, write_json_atomically, write_text_atomically
from symnoise_megatron.common.processes import pid_alive


def test_sha256_of_a_file_spanning_several_chunks(tmp_path):
    data = os.urandom(2 * HASH_CHUNK_BYTES + 3)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_of_file(str(path)) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("options", [dict(indent=2), dict(indent=1, ensure_ascii=False), dict(indent=1, sort_keys=True)])
def test_json_is_written_as_json_dump_writes_it_and_no_temporary_is_left(tmp_path, options):
    value = {"b": [1, 2.5, "é"], "a": {"z": None}}
    path = tmp_path / "out.json"
    path.write_text("old")
    write_json_atomically(str(path), value, fsync=True, **options)
    assert path.read_text(encoding="utf-8") == json.dumps(value, **options)
    assert os.listdir(tmp_path) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "latest_checkpointed_iteration.txt"
    path.write_text("8")

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomically(str(path), "16", fsync=True)
    assert path.read_text() == "8" and os.listdir(tmp_path) == [path.name]


def test_a_finished_process_is_not_alive():
    finished = subprocess.Popen(["true"])
    finished.wait()
    assert pid_alive(os.getpid()) and not pid_alive(finished.pid)
