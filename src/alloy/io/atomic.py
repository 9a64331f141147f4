"""Atomic output folders: all or nothing, never half.

Everything is written into a hidden temporary sibling of the destination (same filesystem, so the
final step is a rename). Commit swaps it into place; any exception, Ctrl-C or SIGTERM removes it.
A SIGKILL or power loss can leave the hidden sibling behind but never a partial destination; the
next write to the same destination removes siblings whose writing process is gone.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType

from alloy.errors import OutputExistsError

_TMP_TAG = ".alloy-tmp-"
_OLD_TAG = ".alloy-old-"


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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(out: Path) -> list[Path]:
    """Remove temporary siblings of `out` left by processes that no longer run."""
    removed: list[Path] = []
    prefix = f".{out.name}"
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        name = entry.name
        for tag in (_TMP_TAG, _OLD_TAG):
            if name.startswith(prefix + tag):
                pid_text = name[len(prefix + tag) :].split("-", 1)[0]
                if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
    return removed


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
        check_output_folder(self.out, force=self.force)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(self.out)
        tag = f"{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = self.out.parent / f".{self.out.name}{tag}"
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> None:
        assert self.tmp is not None, "commit() outside the context"
        # Re-check: the destination may have appeared while we were writing.
        check_output_folder(self.out, force=self.force)
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
