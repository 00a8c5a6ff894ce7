"""Checkpoint integrity: a checkpoint counts only when every file matches its manifest.

Rank 0 writes a checkpoint's files, then `checkpoint_manifest.json` (the sha256 and size of every
other file, and the epoch) last. Ray uploads the folder to storage in an order of its own, so
completeness is judged by verification, not by the manifest being present: a folder whose manifest is
missing, unreadable, or disagrees with any file (torn upload, a worker killed mid-write, a disk that
lied) is never resumed from, registered or served.

Ray Train can lose a hard-killed worker's last report while the checkpoint it uploaded stays on disk;
`newest_complete` finds such folders too, so a restart loses at most the epoch that was running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, List, Optional, Tuple

from orchestrator.registry import storage

log = logging.getLogger(__name__)

MANIFEST = "checkpoint_manifest.json"
CHECKPOINT_PREFIX = "checkpoint_"


class TornCheckpoint(Exception):
    """A checkpoint whose files do not match its manifest (or that has none)."""


@dataclass(frozen=True)
class CompleteCheckpoint:
    """A verified checkpoint folder: its path inside the storage root's filesystem, its epoch, and
    the verified bytes of the files it was asked to keep."""

    path: str
    epoch: int
    files: Dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)


def write_manifest(folder: str, epoch: int) -> Dict[str, Any]:
    """Write the manifest of every file in local `folder`; call it after every other file is written."""
    files = {}
    for name in sorted(os.listdir(folder)):
        if name == MANIFEST:
            continue
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {"epoch": int(epoch), "files": files}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


def verify(root: str, path: str) -> Dict[str, Any]:
    """The manifest of checkpoint folder `path` (inside `root`'s filesystem) after checking every file.

    Raises TornCheckpoint naming what is wrong.
    """
    return _check(root, path, keep=())[0]


def read_verified(root: str, path: str) -> Tuple[Dict[str, Any], Dict[str, bytes]]:
    """The manifest of checkpoint folder `path` and the bytes of every file it lists, each checked
    against its sha256 (one read per file). Raises TornCheckpoint naming what is wrong."""
    return _check(root, path, keep=None)


def _check(root: str, path: str, *, keep: Optional[Collection[str]]) -> Tuple[Dict[str, Any], Dict[str, bytes]]:
    """Verify every file of the checkpoint at `path`; return the manifest and the bytes of the files
    named in `keep` (None: all). Files not kept are dropped once checked, one at a time in memory."""
    fs, _ = storage.filesystem(root)
    path = path.rstrip("/")
    try:
        manifest = json.loads(fs.cat_file(f"{path}/{MANIFEST}"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TornCheckpoint(f"{path}: no readable {MANIFEST} ({type(err).__name__}: {err})") from err
    contents = {}
    for name, expected in files.items():
        try:
            data = fs.cat_file(f"{path}/{name}")
        except OSError as err:
            raise TornCheckpoint(f"{path}: {name} is listed in the manifest but missing") from err
        if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise TornCheckpoint(
                f"{path}: {name} does not match its sha256 in the manifest "
                f"({len(data)} bytes, {expected['bytes']} expected)"
            )
        if keep is None or name in keep:
            contents[name] = data
    return manifest, contents


def is_complete(root: str, path: str) -> bool:
    try:
        verify(root, path)
        return True
    except TornCheckpoint as err:
        log.debug("incomplete checkpoint: %s", err)  # often one Ray deleted on purpose (num_to_keep)
        return False


def complete_checkpoints(root: str, run_path: str, *, keep: Collection[str] = ()) -> List[CompleteCheckpoint]:
    """Every verified checkpoint folder of the run stored at `run_path` (inside `root`'s filesystem),
    oldest epoch first, each with the bytes of its files named in `keep` (read once, while verifying)."""
    fs, _ = storage.filesystem(root)
    if not fs.exists(run_path):
        return []
    found = []
    for entry in fs.ls(run_path, detail=True):
        name = entry["name"].rstrip("/")
        if entry["type"] != "directory" or not name.rsplit("/", 1)[-1].startswith(CHECKPOINT_PREFIX):
            continue  # e.g. Ray's checkpoint_manager_snapshot.json
        try:
            manifest, files = _check(root, name, keep=keep)
            found.append(CompleteCheckpoint(path=name, epoch=int(manifest["epoch"]), files=files))
        except TornCheckpoint as err:
            log.warning("not resuming from torn checkpoint: %s", err)
    return sorted(found, key=lambda c: (c.epoch, c.path))


def newest_complete(root: str, run_path: str, *, also: Optional[str] = None) -> Optional[CompleteCheckpoint]:
    """The verified checkpoint of the run with the highest epoch, or None.

    `also` is a checkpoint path Ray handed over (it may live outside `run_path` after a restore).
    """
    candidates = complete_checkpoints(root, run_path)
    if also is not None and all(c.path != also.rstrip("/") for c in candidates):
        try:
            candidates.append(CompleteCheckpoint(path=also.rstrip("/"), epoch=int(verify(root, also)["epoch"])))
        except TornCheckpoint as err:
            log.warning("not resuming from torn checkpoint: %s", err)
    return max(candidates, key=lambda c: c.epoch, default=None)
