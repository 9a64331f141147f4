"""SHA-256 of weight files, remembered across runs while a file provably has not changed.

Model cards record the SHA-256 of every input weight file (the digest the Hugging Face Hub shows
for LFS files). Hashing is the one part of a card whose cost grows with the inputs: about
1.3 GB/s of one core on the reference machine, so three 7B inputs cost some 30 s of CPU, taken
from a merge that wants every core. Users re-run merges on the same inputs while they tune a
recipe, so a file's digest is cached under its identity: device, inode, size, mtime and ctime.
Rewriting a file changes its mtime and ctime, replacing it by a rename changes its inode, and
ctime cannot be set back by `touch`, so an unchanged identity means unchanged bytes.

One race remains: a write in the same timestamp tick as the hash leaves the identity as it was.
So, like git's "racy clean" rule, a digest is cached only for a file whose last change is at least
`RACY_SECONDS` older than the moment hashing started.

The cache is $ALLOY_CACHE_DIR/sha256.json, else $XDG_CACHE_HOME/alloy/sha256.json, else
~/.cache/alloy/sha256.json; `ALLOY_HASH_CACHE=0` turns it off. It is only a cache: when it is
missing, corrupt or unwritable it is ignored, and it can never fail the job that hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard

RACY_SECONDS = 2.0
MAX_ENTRIES = 4096  # least recently used entries beyond this are dropped
_CHUNK = 8 << 20
_LOCK = threading.Lock()  # one writer of the cache file per process at a time


def cache_file() -> Path | None:
    """Where digests are cached, or None when caching is turned off."""
    if os.environ.get("ALLOY_HASH_CACHE", "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    folder = os.environ.get("ALLOY_CACHE_DIR")
    if not folder:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = str(Path(xdg) / "alloy")
    return Path(folder) / "sha256.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 (hex) of a file's bytes, from the cache when the file has not changed."""
    return files_sha256([path])[0]


def files_sha256(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The SHA-256s of several files (one cache read and one cache write for all of them)."""
    store = cache_file()
    entries = _load(store) if store is not None else {}
    updates: dict[str, dict] = {}
    digests = []
    for given in paths:
        path = Path(given).resolve()
        started = time.time_ns()
        identity = _identity(path.stat())
        entry = entries.get(str(path))
        if _valid(entry) and entry["id"] == identity:
            digests.append(entry["sha256"])
            updates[str(path)] = entry  # refreshes its place in the LRU order
            continue
        digest = _hash(path)
        after = path.stat()
        settled = started - max(after.st_mtime_ns, after.st_ctime_ns) >= RACY_SECONDS * 1e9
        if _identity(after) == identity and settled:
            updates[str(path)] = {"id": identity, "sha256": digest}
        digests.append(digest)
    if store is not None and updates:
        _save(store, updates)
    return digests


def _valid(entry: object) -> TypeGuard[dict[str, Any]]:
    """Whether a cache entry has the shape this module writes (a hand-edited cache may not)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return False
    return len(entry["sha256"]) == 64 and isinstance(entry.get("id"), list)


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _load(store: Path) -> dict[str, dict]:
    try:
        entries = json.loads(store.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _save(store: Path, updates: dict[str, dict]) -> None:
    """Add or refresh entries; the file is rewritten whole through a rename, so a reader never
    sees half of it (a concurrent writer's entries may be lost: it is only a cache)."""
    with _LOCK, contextlib.suppress(OSError):
        entries = _load(store)
        for key, entry in updates.items():
            entries.pop(key, None)
            entries[key] = entry  # dicts keep insertion order: most recently used last
        while len(entries) > MAX_ENTRIES:
            entries.pop(next(iter(entries)))
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".{store.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_text(json.dumps(entries))
            tmp.replace(store)
        finally:
            tmp.unlink(missing_ok=True)
