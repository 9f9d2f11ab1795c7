"""The software versions a run records, and the git commit of a checkout."""

import subprocess
import sys
from importlib import metadata
import types

from symnoise_megatron.common.versions import checkout_commit, software_versions


def git(directory, *args):
    return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_the_commit_of_a_checkout_and_whether_tracked_files_changed(tmp_path):
    assert checkout_commit(str(tmp_path)) is None  # an installed package: no .git beside it
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert checkout_commit(str(tmp_path)) == head
    (tmp_path / "untracked.txt").write_text("not part of the package")
    assert checkout_commit(str(tmp_path)) == head
    (tmp_path / "a.txt").write_text("two")
    assert checkout_commit(str(tmp_path)) == head + "+uncommitted"


def test_versions_are_the_installed_ones(monkeypatch):
    import torch

    versions = software_versions()
    assert versions["python"] == "%d.%d.%d" % sys.version_info[:3]
    assert versions["torch"] == torch.__version__ and versions["megatron-core"] == metadata.version("megatron-core")
    assert "transformer-engine" not in versions  # not installed here
    monkeypatch.setitem(sys.modules, "transformer_engine", types.SimpleNamespace(__version__="2.11.0"))
    assert software_versions()["transformer-engine"] == "2.11.0"
