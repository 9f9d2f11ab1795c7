"""The software a run used: Python, torch, megatron-core, Transformer Engine when installed, and
this package (with its git commit when it runs from a checkout)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Dict, Optional

# Distribution names as pip knows them; one that is not installed is left out of the record.
DISTRIBUTIONS = ("torch", "megatron-core", "transformer-engine", "symnoise-megatron")
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def software_versions() -> Dict[str, object]:
    versions: Dict[str, object] = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    # torch's own version names its build (``+cpu``, ``+cu130``), which a wheel's metadata may not.
    torch = sys.modules.get("torch")
    if getattr(torch, "__version__", None):
        versions["torch"] = str(torch.__version__)
    # A Transformer Engine built from source may be installed under another distribution name;
    # the trainer has imported it by then when it is used.
    engine = sys.modules.get("transformer_engine")
    if "transformer-engine" not in versions and getattr(engine, "__version__", None):
        versions["transformer-engine"] = str(engine.__version__)
    commit = checkout_commit()
    if commit:
        versions["symnoise-megatron git"] = commit
    return versions


def checkout_commit(directory: str = _CHECKOUT) -> Optional[str]:
    """The commit of the checkout this package runs from, with ``+uncommitted`` when tracked files
    differ from it; None for an installed wheel (no ``.git`` beside the package) or without git."""
    if not os.path.exists(os.path.join(directory, ".git")):
        return None
    try:
        commit = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", directory, "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+uncommitted" if changed else "")
