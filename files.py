"""Writing files safely: every output appears whole under its final name or not at all.

- `atomic_write(path, write)`: `write(tmp)` fills a temporary file next to `path`, which is then fsynced, renamed
  into place, and its folder fsynced, so a crash or power loss leaves the old file or the new one, never a part.
- `atomic_folder(path, write)`: the same for a whole folder (a frame folder, an engine folder, a checkpoint).
- `scratch_folder(next_to)`: a temporary work folder on the same file system, removed on exit.
- `publish(tmp, path)`: fsync a finished file and rename it into place (for writers that make several files).
- `file_digest(path)`: a file's sha256, for caches that must notice a damaged entry.
- `file_lock(target)`: an exclusive lock between processes that build the same `target` (an engine, an export):
  the second one waits, then finds the finished result.

Outputs get the ordinary mode (0666 / 0777 less the umask, as `open` and `mkdir` give), not the 0600 / 0700 of
`tempfile` (or of writers such as safetensors that use it), so they are readable as the user's umask intends. Every failure, Ctrl-C
(KeyboardInterrupt) included, removes what was written under a temporary name.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

FILE_MODE, FOLDER_MODE = 0o666, 0o777  # less the umask, as open() and mkdir() apply it
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


class WriteError(OSError):
    """An output could not be written (no space, no permission, a file in the way); nothing was left behind.
    The message names the path and what to do."""


def write_error(path: Path, exc: OSError) -> OSError:
    """`exc`, raised while writing `path`, as a WriteError whose message says what to do."""
    if isinstance(exc, WriteError) or exc.errno is None:  # ours already, or an error with its own message
        return exc
    reason = exc.strerror or str(exc)
    if exc.errno in NO_SPACE:
        message = (f"no space left on the disk holding {path.parent} while writing {path} ({reason}); free some "
                   "space or choose another location.")
    elif exc.errno in NOT_ALLOWED:
        message = f"cannot write {path}: its folder {path.parent} is not writable ({reason}); choose another place."
    elif exc.errno == errno.EISDIR:
        message = f"cannot write {path}: a folder of that name is in the way ({reason}); choose another file name."
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        message = f"cannot write {path}: its folder {path.parent} is not a writable folder ({reason})."
    else:
        message = f"could not write {path} ({exc}); nothing was left behind."
    return WriteError(message)


@contextlib.contextmanager
def explained_write_errors(path: str | Path) -> Iterator[None]:
    """Re-raise an OSError from writing `path` as the WriteError `write_error` makes of it."""
    try:
        yield
    except OSError as exc:
        error = write_error(Path(path), exc)
        if error is exc:
            raise
        raise error from exc


def _temp_name(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"


def _new_temp_file(path: Path) -> Path:
    while True:
        tmp = _temp_name(path, ".tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
            return tmp
        except FileExistsError:
            continue


def _new_temp_folder(path: Path, suffix: str = ".tmp") -> Path:
    while True:
        tmp = _temp_name(path, suffix)
        try:
            os.mkdir(tmp, FOLDER_MODE)
            return tmp
        except FileExistsError:
            continue


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """The sha256 (hex) of a file; kept per (path, size, mtime) for the process, since weights can be many GB."""
    stat = os.stat(path)
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: str | Path) -> None:
    """Flush a folder's entries (new and renamed names) to the disk; a no-op where folders cannot be opened."""
    if os.name == "nt":
        return
    fsync_file(path)


def current_umask() -> int:
    """The process's umask (from /proc on Linux, without changing it; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(path: str | Path, umask: int | None = None) -> None:
    """Give `path` the mode open()/mkdir() would: 0666 (0777 for folders and executables) less the umask.

    Writers that make their own temp file and rename it (safetensors' save_file gives 0600) are corrected so."""
    umask = current_umask() if umask is None else umask
    current = stat.S_IMODE(os.lstat(path).st_mode)
    executable = os.path.isdir(path) or current & 0o100
    wanted = (FOLDER_MODE if executable else FILE_MODE) & ~umask
    if current != wanted:
        os.chmod(path, wanted)


def fsync_tree(folder: str | Path) -> None:
    """Give every file and folder under `folder` (and `folder`) the ordinary mode and fsync it, deepest first."""
    umask = current_umask()
    for root, dirs, names in os.walk(folder, topdown=False):
        for name in names:
            if not os.path.islink(os.path.join(root, name)):
                ordinary_mode(os.path.join(root, name), umask)
                fsync_file(os.path.join(root, name))
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                ordinary_mode(os.path.join(root, name), umask)
                fsync_folder(os.path.join(root, name))
    ordinary_mode(folder, umask)
    fsync_folder(folder)


def publish(tmp: str | Path, path: str | Path) -> Path:
    """Give the finished file `tmp` the ordinary mode, fsync it, rename it to `path` (same file system) and fsync
    the folder."""
    ordinary_mode(tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_folder(Path(path).parent)
    return Path(path)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a new empty file next to `path`, then fsync it and rename it into place; returns `path`.

    `write` may write into `tmp` or replace it. On any failure (Ctrl-C too) the temporary file is removed and an
    existing `path` is left as it was; an OSError comes out as a `WriteError` saying what to do."""
    path = Path(path)
    tmp: Path | None = None
    try:
        with explained_write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _new_temp_file(path)
            write(tmp)
            publish(tmp, path)
    finally:
        if tmp is not None:
            _remove(tmp)
    return path


def atomic_folder(path: str | Path, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Call `write(tmp)` on a new empty folder next to `path`, fsync everything in it and rename it to `path`.

    An existing `path` is an error (FileExistsError) unless `replace`, which swaps the new folder in and then
    deletes the old one. On any failure (Ctrl-C too) the temporary folder is removed and `path` is untouched."""
    path = Path(path)
    tmp = old = None
    try:
        with explained_write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _new_temp_folder(path)
            write(tmp)
            fsync_tree(tmp)
            if path.exists() or path.is_symlink():
                if not replace:
                    raise FileExistsError(f"{path} already exists; choose another folder or replace it")
                if not path.is_dir():
                    raise NotADirectoryError(f"{path} exists and is not a folder; choose another name")
                old = _temp_name(path, ".old")
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:  # put the old folder back
                    os.replace(old, path)
                    old = None
                raise
            fsync_folder(path.parent)
    finally:
        for leftover in (tmp, old):
            if leftover is not None:
                _remove(leftover)
    return path


@contextlib.contextmanager
def scratch_folder(next_to: str | Path, tag: str = "scratch") -> Iterator[Path]:
    """A new empty folder beside `next_to` (so its files can be renamed into place), removed on exit."""
    next_to = Path(next_to)
    next_to.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_folder(next_to.with_name(f"{next_to.name}.{tag}"))
    try:
        yield tmp
    finally:
        _remove(tmp)


def _lock(fd: int, blocking: bool) -> bool:
    """Take the exclusive lock on `fd`; False when `blocking` is off and another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not blocking:
                    return False
                import time

                time.sleep(0.2)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def file_lock(target: str | Path) -> Iterator[None]:
    """Hold an exclusive lock for making `target`, through the lock file `.<name>.lock` beside it.

    A second process (or thread) asking for the same target waits, logging that it does, until the first one
    leaves; it should then look again for the finished target. The lock file is removed on exit; a waiter that
    wakes up on a removed lock file takes a fresh one, so two holders never overlap."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            if not _lock(fd, blocking=False):
                log.info("waiting for another process that is making %s (lock file %s)", target, lock)
                _lock(fd, blocking=True)
            try:
                current = os.stat(lock).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed this lock file while we waited: lock the new one
    try:
        yield
    finally:
        if os.name != "nt":
            lock.unlink(missing_ok=True)
        os.close(fd)
