"""One run per run folder: an exclusive `flock` on `<folder>/.mora_dist.lock`, held for the run.

Two runs writing one `run.out_dir` / `checkpoint.dir` destroy each other's checkpoints and
metrics, so the second one must stop at once with a one-line error naming the folder and the
holder. `flock` belongs to the open file: the kernel drops it when the holder exits, however it
exits (kill -9 included), so a lock file left behind by a dead run is never "stale" - the next run
simply takes it. The file is never deleted (deleting it would let a third run lock a fresh inode
while the second still holds the old one). On NFS, Linux maps flock to NFS byte-range locks, so
this also holds between nodes on a shared filesystem that supports locking.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time

LOCK_NAME = ".mora_dist.lock"


class LockError(RuntimeError):
    pass


class RunLock:
    """Exclusive locks on several folders (deduplicated by real path); `release()` or process exit frees them."""

    def __init__(self, folders, what: str = "run"):
        self._fds: list[int] = []
        seen = set()
        try:
            for key, folder in folders:
                real = os.path.realpath(folder)
                if real in seen:
                    continue
                seen.add(real)
                self._fds.append(_lock(key, folder, what))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())  # closing the descriptor drops the flock


def _lock(key: str, folder: str, what: str) -> int:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        raise LockError(f"{key} {folder} is in use by another {what} ({holder}); wait for it to finish or "
                        f"choose another {key}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    return fd
