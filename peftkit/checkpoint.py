"""Atomic checkpoint folders with a manifest of sizes and checksums.

A folder is written under a temporary name and renamed into place only when complete, and its
``manifest.json`` lists every file's size and SHA-256. Resume and merge verify the manifest, so a
folder cut short by a crash or truncated later is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STEP_RE = re.compile(r"^step-(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file (but the manifest) with its size and checksum."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    write_json(folder / MANIFEST, {"files": files})


def verify_manifest(folder: Path) -> str | None:
    """``None`` when the folder matches its manifest, else the reason it does not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{folder} has no {MANIFEST} (incomplete or not written by peftkit)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return f"{manifest} is unreadable"
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {meta['size']} (truncated?)"
        if _sha256(path) != meta["sha256"]:
            return f"{path} does not match its checksum (corrupted?)"
    return None


def write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and an atomic rename: never half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str))


def temp_dir_for(target: Path) -> Path:
    """The temporary sibling a folder is written in before it is renamed to ``target``."""
    return target.parent / f".{target.name}.tmp"


def begin(target: Path) -> Path:
    """Start writing ``target``: a fresh, empty temporary folder next to it."""
    tmp = temp_dir_for(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(target: Path) -> None:
    """Seal the temporary folder of ``target`` with a manifest and rename it into place.

    An existing ``target`` is moved aside first and removed only after the new one is in place,
    so at every instant one complete version exists.
    """
    tmp = temp_dir_for(target)
    write_manifest(tmp)
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def step_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``checkpoints/step-N`` folders, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_valid(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose manifest verifies, and the reasons newer ones were skipped."""
    skipped = []
    for _, path in reversed(step_checkpoints(root)):
        reason = verify_manifest(path)
        if reason is None:
            return path, skipped
        skipped.append(reason)
    return None, skipped


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` step checkpoints."""
    ckpts = step_checkpoints(root)
    for _, path in ckpts[: max(len(ckpts) - keep, 0)]:
        shutil.rmtree(path, ignore_errors=True)
