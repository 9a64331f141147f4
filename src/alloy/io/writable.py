"""Output paths checked before the work starts, and small output files written whole.

A command checks every path it will write (`check_writable`) before it loads or scores anything,
so that an hour of work is never lost at the last write, and a path that cannot be written gives
an `InputError` naming the path the user gave (never a hidden temporary sibling) and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import uuid
from pathlib import Path

from alloy.errors import InputError

_FIX = "choose another path or fix the folder's permissions"


def check_writable(path: str | os.PathLike[str], what: str, *, folder: bool = True) -> None:
    """Raise `InputError` unless `path` can be created (or replaced) as a folder, or a file.

    Outputs are written as a hidden sibling and renamed into place, so what must be writable is
    the nearest existing ancestor of `path`'s parent: it must be a folder in which a file can be
    created and removed (a real probe, which also catches read-only filesystems). An existing
    `path` must be of the expected kind.

    Args:
        what: how the user gave the path, for the message ("OUT", "--json").
        folder: `path` is an output folder (else an output file).
    """
    given = Path(path)
    name = f"{what} {given}"
    if folder and given.exists() and not given.is_dir():
        raise InputError(f"{name}: exists and is a file, not a folder; choose another path")
    if not folder and given.is_dir():
        raise InputError(f"{name}: is a folder, not a file; give a file path")
    ancestor = nearest_existing(given.parent)
    where = ancestor if str(ancestor) != "." else Path.cwd()
    if not ancestor.is_dir():
        raise InputError(
            f"{name}: cannot be created, {where} is a file, not a folder; choose another path"
        )
    reason = _unwritable(ancestor)
    if reason is not None:
        raise InputError(f"{name}: cannot write in {where}: {reason}; {_FIX}")


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (as a folder or anything else)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_file(path: str | os.PathLike[str], text: str, what: str) -> None:
    """Write `text` to `path` whole: a hidden sibling, then a rename, so a reader never sees half
    a file. On failure nothing is left (sibling and created folders removed) and the `OSError`
    becomes an `InputError` naming `path` as the user gave it (`what`: "--json", "--out")."""
    given = Path(path)
    created = []
    parent = given.parent
    while not parent.exists() and parent != parent.parent:
        created.append(parent)  # deepest first: the order to remove them in
        parent = parent.parent
    tmp = given.with_name(f".{given.name}.alloy-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        given.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(given)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise InputError(f"{what} {given}: cannot write: {describe(exc)}; {_FIX}") from exc


def describe(exc: OSError) -> str:
    """An OSError's reason in words, without the temporary path it may name."""
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.ENOENT:
        return "new files cannot be created there"
    if exc.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    return (exc.strerror or str(exc)).lower()


def _unwritable(folder: Path) -> str | None:
    """Why no file can be created in `folder`, or None if one can."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    try:
        fd, probe = tempfile.mkstemp(prefix=".alloy-probe-", dir=folder)
    except OSError as exc:
        return describe(exc)
    os.close(fd)
    with contextlib.suppress(OSError):
        Path(probe).unlink()
    return None
