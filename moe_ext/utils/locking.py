"""Advisory locks on saved folders, so that several processes can save to and load from one
folder at once: a save holds an exclusive lock on the folder for the whole save, a load a
shared one while it reads, so a load never sees half of a save's renames and two saves
never interleave.

The lock is flock(2) on the folder itself (no lock file is left behind, and a reader needs
no write permission); the kernel drops it when its process dies, so a killed save never
leaves a folder locked. Where flock is missing (Windows) or refused (some network file
systems), saves and loads go on unlocked: the checksums each config records still turn
a torn read into a clear error instead of a silent mix (see saved_folder.py).

A process waits for another's lock at most MOE_EXT_LOCK_TIMEOUT seconds (default 600),
then raises TimeoutError naming the folder: a stopped writer never hangs its readers."""
from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # Windows: no flock; saves and loads go on unlocked
    fcntl = None

TIMEOUT_ENV = "MOE_EXT_LOCK_TIMEOUT"
DEFAULT_TIMEOUT = 600.0

_held = threading.local()  # {realpath: [exclusive, depth, locked]} of the locks this thread holds


def lock_timeout() -> float:
    """Seconds to wait for another process's lock (MOE_EXT_LOCK_TIMEOUT); ValueError naming
    the variable when it is not a number >= 0."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a finite number of seconds >= 0, got {raw!r}")
    return value


def _open_folder(directory: str) -> Optional[int]:
    if fcntl is None:
        return None
    try:
        return os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None


def _acquire(fd: int, exclusive: bool, directory: str, timeout: float) -> bool:
    """Waits for the lock, polling so that the wait is bounded; False when the file system
    does not support flock (the caller goes on unlocked)."""
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline, pause = time.monotonic() + timeout, 0.002
    while True:
        try:
            fcntl.flock(fd, mode)
            return True
        except BlockingIOError:
            pass
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                pass
            else:  # ENOLCK, EOPNOTSUPP, EBADF (NFS on a folder): no locking here
                return False
        if time.monotonic() >= deadline:
            what = "saving to" if exclusive else "reading"
            raise TimeoutError(f"{directory!r} stayed locked by another process's save or load "
                               f"for {timeout:g} s (waiting before {what} it); try again when it "
                               f"has finished, or raise {TIMEOUT_ENV}")
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


@contextlib.contextmanager
def folder_lock(directory: str, exclusive: bool) -> Iterator[bool]:
    """Holds flock on `directory` (which must exist): exclusive for a save, shared for a
    load; yields whether the folder is really locked (False where flock is unsupported).
    Re-entrant within a thread (a save inside a save of the same folder holds the one
    lock); a shared lock cannot be raised to an exclusive one (RuntimeError)."""
    key = os.path.realpath(directory)
    held = getattr(_held, "locks", None)
    if held is None:
        held = _held.locks = {}
    if key in held:
        if exclusive and not held[key][0]:
            raise RuntimeError(f"cannot save to {directory!r} while loading it in the same thread")
        held[key][1] += 1
        try:
            yield held[key][2]
        finally:
            held[key][1] -= 1
        return
    fd = _open_folder(directory)
    if fd is None:
        yield False
        return
    try:
        locked = _acquire(fd, exclusive, directory, lock_timeout())
        held[key] = [exclusive, 1, locked]
        try:
            yield locked
        finally:
            del held[key]
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def try_exclusive(directory: str) -> tuple[Optional[int], bool]:
    """(an fd holding the exclusive lock on `directory`, True) if no process holds any lock
    on it right now (and this thread holds none); (None, True) if one does; (None, False)
    where there is no flock. Release the fd with release()."""
    if os.path.realpath(directory) in (getattr(_held, "locks", None) or {}):
        return None, True
    fd = _open_folder(directory)
    if fd is None:
        return None, fcntl is not None and os.path.isdir(directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, True
    except OSError as err:
        os.close(fd)
        return None, err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
