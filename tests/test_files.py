"""Durable writes and the run-folder lock: what a crash, a power cut or a second run may not break."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, subprocess_env
from gpt.files import FolderInUse, FolderLock, asides, publish_folder, restore_aside, write_atomic


class DiskLog:
    """Records, in order, every fsync (by path) and every rename, as the kernel would see them."""

    def __init__(self, monkeypatch):
        self.events = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            self.events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
            return real_fsync(fd)

        def replace(src, dst):
            self.events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
            return real_replace(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, event) -> int:
        return self.events.index(event)

    def renames(self, dst):
        return [i for i, e in enumerate(self.events) if e[0] == "rename" and e[2] == os.path.realpath(dst)]

    def synced_before(self, path, position) -> bool:
        return ("fsync", os.path.realpath(path)) in self.events[:position]

    def synced_after(self, path, position) -> bool:
        return ("fsync", os.path.realpath(path)) in self.events[position + 1:]


def assert_published_durably(disk: DiskLog, final, files):
    """Every file and folder of the new tree hit the disk before the rename, the parent after it."""
    (rename,) = disk.renames(final)
    src = disk.events[rename][1]
    for rel in files:
        assert disk.synced_before(os.path.join(src, rel), rename), rel
    assert disk.synced_before(src, rename)
    assert disk.synced_after(os.path.dirname(final), rename)


def make_tree(folder, content):
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_text(content)
    (folder / "sub" / "b.txt").write_text(content * 2)


def test_publish_folder_flushes_everything_before_the_rename(tmp_path, monkeypatch):
    disk = DiskLog(monkeypatch)
    make_tree(tmp_path / "new", "x")
    publish_folder(tmp_path / "new", tmp_path / "final")
    assert_published_durably(disk, tmp_path / "final", ["a.bin", "sub/b.txt", "sub"])
    assert (tmp_path / "final" / "sub" / "b.txt").read_text() == "xx"


def test_write_atomic_flushes_before_and_after_the_rename(tmp_path, monkeypatch):
    disk = DiskLog(monkeypatch)
    write_atomic(tmp_path / "latest", "step-000020")
    (rename,) = disk.renames(tmp_path / "latest")
    assert disk.synced_before(disk.events[rename][1], rename) and disk.synced_after(tmp_path, rename)
    assert (tmp_path / "latest").read_text() == "step-000020"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_replacing_keeps_the_old_or_the_new_whole_at_every_moment(tmp_path, monkeypatch):
    """Kill between the two renames: the old folder is whole aside, and the next publish restores it first."""
    make_tree(tmp_path / "final", "old")
    make_tree(tmp_path / "new", "new")
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        publish_folder(tmp_path / "new", tmp_path / "final", replace=True)
    monkeypatch.setattr(os, "replace", real_replace)
    (aside,) = asides(tmp_path / "final")
    assert (aside / "a.bin").read_text() == "old" and (tmp_path / "new" / "a.bin").read_text() == "new"
    restore_aside(tmp_path / "final")
    assert (tmp_path / "final" / "sub" / "b.txt").read_text() == "oldold" and not asides(tmp_path / "final")

    publish_folder(tmp_path / "new", tmp_path / "final", replace=True)  # the interrupted replace, done again
    assert (tmp_path / "final" / "a.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_publish_refuses_to_replace_unless_asked(tmp_path):
    make_tree(tmp_path / "final", "old")
    make_tree(tmp_path / "new", "new")
    with pytest.raises(FileExistsError):
        publish_folder(tmp_path / "new", tmp_path / "final")
    assert (tmp_path / "final" / "a.bin").read_text() == "old"


HOLD = ("import sys, time; from gpt.files import FolderLock; lock = FolderLock(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)")


def test_a_second_holder_is_refused_with_the_first_ones_name_and_a_kill_frees_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=f"pid {holder.pid} on "):
            FolderLock(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.time() + 5
    while True:  # the kernel drops a dead process's flock
        try:
            lock = FolderLock(tmp_path)
            break
        except FolderInUse:
            assert time.time() < deadline
            time.sleep(0.05)
    assert f"pid {os.getpid()} " in lock.holder()
    lock.release()


def test_weights_are_readable_as_any_new_file_is(run_dir, tmp_path):
    """safetensors 0.8 leaves what it writes at 0600; a checkpoint's and a transformers folder's weights
    get the mode config.json beside them gets, so another user (a server, a container) can read them."""
    from pathlib import Path

    from gpt.checkpoint import load_checkpoint
    from gpt.hf import export_hf_folder

    model, tokenizer, meta = load_checkpoint(run_dir)
    for folder in (Path(meta["path"]), tmp_path / "hf"):
        if folder.name == "hf":
            export_hf_folder(model, tokenizer, folder)
        mode = (folder / "model.safetensors").stat().st_mode
        assert mode == (folder / "config.json").stat().st_mode and mode & 0o044 == 0o044, (folder, oct(mode))
