"""Checkpoint retention (--keep-last, --keep-every): which older checkpoints of a run to remove
once a new one is complete.

A 70B checkpoint is about 1 TB, so a run that saves every few hundred iterations fills a file
system; keeping them all is still the default. Removal happens only after a save has been
published (renamed from ``.partial``, its manifest written, the tracker moved to it) and only
when the new checkpoint's files match its manifest; the checkpoint the tracker names is never
removed. A folder is first renamed to ``iter_N.removing`` (atomic: no reader ever sees half
a checkpoint under its ``iter_N`` name) and then deleted, so a crash in between leaves a
``.removing`` folder that the next save deletes. A crash between a save and the removal
leaves extra checkpoints, which the next save removes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import List, Optional

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.training.checkpointing import complete_per_manifest

REMOVING = ".removing"


@dataclass
class RetentionPlan:
    """What one pass over ``root`` keeps and removes, by folder name."""

    keep: List[str]
    remove: List[str]


def plan_retention(root: str, keep_last: int, keep_every: Optional[int] = None) -> Optional[RetentionPlan]:
    """The folders to keep and remove after the checkpoint the tracker names was saved; None when that
    checkpoint does not match its manifest (nothing may go then).

    Kept: the tracker's iteration; the ``keep_last`` newest checkpoints up to it whose files match
    their manifests (so the kept ones are good ones, and a damaged one does not take a place);
    iterations that are multiples of ``keep_every``. Removed: every other finished checkpoint older
    than the tracker's, unfinished saves (``.partial``) older than it, and ``.removing`` leftovers.
    Newer folders than the tracker's (a run rolled back by hand) are left alone."""
    latest = paths.read_tracker(root)
    if latest is None or not complete_per_manifest(paths.iteration_dir(root, latest)):
        return None
    names = os.listdir(root)
    finished = sorted((n for n in map(paths.iteration_of, names) if n is not None and n <= latest), reverse=True)
    good = [n for n in finished if n == latest or complete_per_manifest(paths.iteration_dir(root, n))]
    kept = set(good[:keep_last]) | {latest}
    if keep_every:
        kept |= {n for n in finished if n % keep_every == 0}
    # Leftovers first: an iter_N.removing must be gone before iter_N can be renamed to it.
    remove = sorted(name for name in names if name.endswith(REMOVING))
    unfinished = {name: paths.iteration_of(name[: -len(".partial")]) for name in names if name.endswith(".partial")}
    remove += sorted(name for name, n in unfinished.items() if n is not None and n < latest)
    remove += [os.path.basename(paths.iteration_dir(root, n)) for n in sorted(finished) if n not in kept]
    return RetentionPlan(keep=[os.path.basename(paths.iteration_dir(root, n)) for n in sorted(kept)], remove=remove)


def remove_old_checkpoints(root: str, keep_last: int, keep_every: Optional[int] = None, log=print) -> List[str]:
    """Apply ``plan_retention`` (one process: the run's rank 0); the names removed."""
    plan = plan_retention(root, keep_last, keep_every)
    if plan is None:
        log(f"WARNING: the latest checkpoint in {root} does not match its manifest: no older checkpoint removed")
        return []
    for name in plan.remove:
        path = os.path.join(root, name)
        doomed = path if name.endswith(REMOVING) else path + REMOVING
        if doomed != path:
            os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    if plan.remove:
        log(f"removed {', '.join(plan.remove)} from {root} (--keep-last {keep_last}"
            f"{f', --keep-every {keep_every}' if keep_every else ''}; kept {', '.join(plan.keep)})")
    return plan.remove
