"""One run per run folder: `<out>/.lock`, held for the life of the run.

Rank 0 creates the folder if needed and takes an exclusive flock(2) on `<out>/.lock`, then writes into
it who holds it (host, pid, start time, command). The kernel drops a flock when its process ends, however
it ends (kill -9 included), so the lock is never held by a dead process:
- another run holding it -> a one-line error naming that run's host and pid (`RunFolderError`);
- a file naming a process that ended without releasing it (killed, crashed host) -> taken over with a
  one-line warning naming the old holder;
- a clean end empties the file (it stays, so nothing is deleted and a racing run locks the same file).
On a file system without locks (flock answers ENOLCK/EOPNOTSUPP) a holder recorded on this host is
refused while its process lives, and the run warns that a holder on another host would go unnoticed.

`hold(out, info, log)` is collective: rank 0 takes the lock and every rank learns the outcome through
one broadcast, so a refused run stops on every rank with the same message. Everything the trainer
writes into the folder (config.json, log.jsonl truncation on resume, checkpoints) happens after it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

from .errors import SslkitError

LOCK_NAME = ".lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


class RunFolderError(SslkitError):
    """A run folder that this run cannot hold or write (in use by another run, read-only, full): one line."""


def _describe(holder: dict) -> str:
    since = holder.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{when}"


def _read_holder(fd: int) -> dict:
    """The record in the lock file ({} when empty or unreadable: a lock file cut short by a crash)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        holder = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _same_file(fd: int, path: str) -> bool:
    """Whether `path` still names the file locked through `fd` (a releasing run may have removed it)."""
    try:
        st, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The exclusive hold of a run folder by this process (`acquire`, `release`)."""

    def __init__(self, out: str, path: str, fd: int, created: bool = False):
        self.out, self.path, self._fd = os.path.abspath(out), path, fd
        self.created = created  # this run made the folder: removed again if the run left nothing in it

    @classmethod
    def acquire(cls, out: str, warn=lambda msg: None) -> "RunLock":
        for _ in range(3):  # again if the file was removed under us (see release)
            created = not os.path.isdir(out)
            fd, path = cls._open(out)
            try:
                cls._lock(fd, path, out, warn)
                if _same_file(fd, path):
                    cls._claim(fd, path, warn)
                    return cls(out, path, fd, created)
            except OSError as e:
                os.close(fd)
                raise RunFolderError(f"{path}: cannot be written: {os_reason(e)}") from None
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise RunFolderError(f"{out}: its lock file keeps disappearing; is another tool deleting {LOCK_NAME}?")

    @staticmethod
    def _open(out: str) -> tuple[int, str]:
        path = os.path.join(out, LOCK_NAME)
        try:
            os.makedirs(out, exist_ok=True)
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), path
        except OSError as e:
            raise RunFolderError(f"{e.filename or out}: cannot be used as the run folder: {os_reason(e)}") from None

    @staticmethod
    def _claim(fd: int, path: str, warn):
        previous = _read_holder(fd)
        if previous:
            warn(f"taking over the stale lock {path} of {_describe(previous)}: that run ended without releasing "
                 "it (killed, or its host went down)")
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": round(time.time(), 3), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)

    @staticmethod
    def _lock(fd: int, path: str, out: str, warn):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _read_holder(fd)
            raise RunFolderError(f"{out} is in use by another run ({_describe(holder)}; lock file {path}): wait for "
                                 "it to end or use another --out") from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
        holder = _read_holder(fd)
        if holder.get("host") == socket.gethostname() and _pid_alive(holder.get("pid")):
            raise RunFolderError(f"{out} is in use by another run ({_describe(holder)}; lock file {path}): wait for "
                                 "it to end or use another --out")
        warn(f"{path}: this file system has no locks; a second run on {out} from another host would not be "
             "noticed")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holds(self, path: str) -> bool:
        """Whether `path` lies in the folder this lock holds (and the lock is still held)."""
        return self.held and os.path.dirname(os.path.abspath(path)) == self.out

    def release(self):
        """Empty the lock file (a clean end leaves no holder to take over) and drop the lock. A folder
        this run created and left empty (it stopped before writing anything: a typo in --data) goes."""
        if self._fd is None:
            return
        try:
            if self.created and os.listdir(self.out) == [LOCK_NAME]:
                os.remove(self.path)  # a run waiting on this file sees it gone and starts over (acquire)
                os.rmdir(self.out)
            else:
                os.ftruncate(self._fd, 0)
        except OSError:
            pass  # a full or read-only disk: the next run takes the lock over with a warning
        os.close(self._fd)
        self._fd = None


# how a failed write or folder creation is worded in every one-line error (ckpt, log, the lock)
OS_REASONS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
              errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
              errno.ENOTDIR: "a part of the path is a file, not a folder"}


def os_reason(e: OSError) -> str:
    if e.errno is None:
        return str(e) or type(e).__name__
    return OS_REASONS.get(e.errno, os.strerror(e.errno).lower())


def hold(out: str, info, log) -> RunLock | None:
    """Collective: rank 0 holds `out` (None on the other ranks); a RunFolderError on rank 0 and the same
    message as an AgreedError on every other rank when it cannot."""
    from .dist import on_main
    return on_main(lambda: RunLock.acquire(out, log.warning), info)
