"""Atomic output folders: all or nothing, never half.

Everything is written into a hidden temporary sibling of the destination (same filesystem, so the
final step is a rename). Commit swaps it into place; any exception, Ctrl-C or SIGTERM removes it.
A SIGKILL or power loss can leave the hidden sibling behind but never a partial destination; the
next alloy write into the same parent folder removes (and reports) siblings whose writing process
is gone. Published files are mode 0644 and folders 0755 (minus the umask), whatever the library
that wrote them chose (safetensors writes 0600).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from types import TracebackType

from alloy.errors import OutputExistsError

_TMP_TAG = ".alloy-tmp-"
_OLD_TAG = ".alloy-old-"
# `.<name>.alloy-tmp-<pid>-<8 hex>` (being written) or `.<name>.alloy-old-<pid>-<8 hex>` (a
# replaced output, renamed aside until the new one is in place); nothing else is ever removed.
_SIBLING = re.compile(r"\.(?P<name>.+)\.alloy-(?P<kind>tmp|old)-(?P<pid>[0-9]+)-[0-9a-f]{8}")
FILE_MODE = 0o644
FOLDER_MODE = 0o755


def user_path(path: str | os.PathLike[str]) -> Path:
    """The path the user asked for, for a path inside a hidden temporary sibling.

    >>> str(user_path("/runs/.merged.alloy-tmp-42-0123abcd/model.safetensors"))
    '/runs/merged/model.safetensors'
    """
    parts = list(Path(path).parts)
    for i, part in enumerate(parts):
        match = _SIBLING.fullmatch(part)
        if match is not None:
            parts[i] = match.group("name")
    return Path(*parts) if parts else Path(path)


log = logging.getLogger(__name__)


def check_output_folder(out: Path, *, force: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without `force`."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(f"{out}: exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(
            f"{out}: folder exists and is not empty; pass --force (Python: force=True) to "
            "replace it, or choose another output path"
        )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OverflowError:  # not a pid this system can have
        return False
    except OSError:  # cannot tell: keep its files
        return True
    return True


def remove_stale_siblings(parent: Path) -> list[Path]:
    """Clean up what killed alloy writes left in `parent`, logging one line per entry.

    A temporary sibling whose writing process no longer runs is removed. A replaced output renamed
    aside (`.alloy-old-`) is removed if its destination exists, and renamed back into place if
    the writer died between the two renames (the new output was never published).
    Returns the entries removed or restored.
    """
    done: list[Path] = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return done
    for entry in entries:
        match = _SIBLING.fullmatch(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        dest = parent / match["name"]
        try:
            if match["kind"] == "old" and not os.path.lexists(dest):
                entry.rename(dest)
                log.warning(
                    "restored %s from %s (left by alloy process %s, no longer running)",
                    dest,
                    entry.name,
                    match["pid"],
                )
            else:
                folder = entry.is_dir() and not entry.is_symlink()
                if folder:
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                log.warning(
                    "removed stale temporary %s %s (left by alloy process %s, no longer running)",
                    "folder" if folder else "file",
                    entry,
                    match["pid"],
                )
        except OSError as exc:
            log.warning("could not clean up stale %s: %s", entry, exc.strerror or exc)
            continue
        done.append(entry)
    return done


class AtomicFolder:
    """Context manager yielding a temporary folder that becomes `out` on success.

    >>> with AtomicFolder(out, force=False) as tmp:   # doctest: +SKIP
    ...     (tmp / "config.json").write_text("{}")
    """

    def __init__(self, out: str | os.PathLike[str], *, force: bool = False) -> None:
        self.out = Path(out).absolute()
        self.force = force
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        remove_stale_siblings(self.out.parent)  # first: it may restore `out` itself
        check_output_folder(self.out, force=self.force)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tag = f"{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = self.out.parent / f".{self.out.name}{tag}"
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> None:
        assert self.tmp is not None, "commit() outside the context"
        # Re-check: the destination may have appeared while we were writing.
        check_output_folder(self.out, force=self.force)
        _set_modes(self.tmp)
        _fsync_tree(self.tmp)
        if self.out.exists():
            old = (
                self.out.parent / f".{self.out.name}{_OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            )
            self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.out)
        _fsync_dir(self.out.parent)
        self.tmp = None

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def _umask() -> int:
    try:  # Linux: read it without changing it (changing it races with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _set_modes(folder: Path) -> None:
    """Files 0644, folders 0755, minus the umask (as `save_pretrained` on a normal umask); a
    file its owner may execute (a program unpacked from a package) stays executable, 0755."""
    keep = ~_umask()
    folder.chmod(FOLDER_MODE & keep)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue  # chmod would follow it
        runs = path.is_dir() or path.stat().st_mode & stat.S_IXUSR
        path.chmod((FOLDER_MODE if runs else FILE_MODE) & keep)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)
