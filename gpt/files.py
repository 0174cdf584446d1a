"""Files that survive a crash or a power cut, and a lock that keeps two runs out of one folder.

A rename is atomic, but only durable once the renamed files' data and the directory entries on
both sides of it have reached the disk. The order that makes "old or new, never neither" true:

    write every file → fsync each file → fsync its folder → rename → fsync the parent folder

`publish_folder` and `write_atomic` follow it; checkpoints, the token cache and export folders
are all written through them, each built first in a `staging()` folder beside its final place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file below `folder`, then every folder, deepest first, `folder` last."""
    folder = Path(folder)
    dirs = []
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        dirs.append(Path(root))
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_path(d)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, leaving the file with the mode any new file gets (0o666 less the umask,
    as config.json beside it): safetensors 0.8 writes through a temporary file created 0600 and
    renames it (safetensors/safetensors#782), which would leave the weights readable by their writer
    alone, so a server or a container running as another user could not load them."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data`: temp file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


@contextlib.contextmanager
def staging(final: str | Path, tag: str | None = None, owner: bool = True) -> Iterator[Path]:
    """A fresh temporary folder beside `final` to build it in (`.NAME.tmp-TAG`, the process id by
    default), removed whatever happens; publish_folder() moves a finished one into place first.

    Several processes can build one folder together: each passes the same `tag`, and only the
    `owner` creates and removes it (the others must wait until it exists)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{tag if tag is not None else os.getpid()}")
    if owner:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(tmp: str | Path, final: str | Path, replace: bool = False) -> None:
    """Move a finished folder into place durably.

    With `replace`, an existing `final` is renamed aside first and deleted only after the new one
    is in place, so a crash at any moment leaves the old folder or the new one whole: between the
    two renames the old one waits as `.NAME.old-PID`, and the next publish puts it back first.
    """
    tmp, final = Path(tmp), Path(final)
    restore_aside(final)
    fsync_tree(tmp)
    aside = None
    if final.exists() or final.is_symlink():
        if not replace:
            raise FileExistsError(f"{final} exists")
        aside = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if aside is not None:
        shutil.rmtree(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink()
        fsync_path(final.parent)


def asides(final: str | Path) -> list[Path]:
    """Folders that publish_folder() renamed aside from `final` and did not get to delete, newest first."""
    final = Path(final)
    found = list(final.parent.glob(f".{final.name}.old-*")) if final.parent.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def restore_aside(final: str | Path) -> None:
    """If a crash came between publish_folder()'s two renames, `final` is missing: put the old one back."""
    final = Path(final)
    left = asides(final)
    if left and not final.exists():
        os.replace(left[0], final)
        fsync_path(final.parent)


@contextlib.contextmanager
def waiting_lock(path: str | Path):
    """Hold an exclusive lock on `path` (created if need be), waiting as long as another holds it."""
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock. The message names it."""


class FolderLock:
    """An exclusive lock on a folder, held for as long as this object lives (or until release()).

    The lock is `flock` on FOLDER/.lock, so the kernel drops it when the holder dies, even by
    SIGKILL: a killed run never leaves a stale lock behind. The file says who holds it.
    """

    def __init__(self, folder: str | Path):
        import fcntl

        self._fd: int | None = None
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / ".lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"{self.folder} is in use by {self.holder()}") from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}).encode())

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']} on {info['host']} (since {info['since']})"
        except (OSError, ValueError, KeyError):
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()
