"""files.py: atomic writes keep the ordinary file mode (umask), fsync file and folder, leave nothing on any failure
(Ctrl-C included), explain a full disk; the inter-process lock never lets two holders overlap (real processes);
and no module renames files into place by itself."""

from __future__ import annotations

import ast
import errno
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ruyi_trt.files import WriteError, atomic_folder, atomic_write, file_digest, file_lock, scratch_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def umask():
    """Run the test under a given umask, restoring the old one."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_and_folders_get_the_ordinary_mode(tmp_path: Path, umask) -> None:
    umask(0o022)
    path = atomic_write(tmp_path / "sub" / "a.json", lambda tmp: tmp.write_text("{}"))
    assert mode(path) == 0o644 and mode(path.parent) == 0o755
    folder = atomic_folder(tmp_path / "frames", lambda tmp: (tmp / "f.png").write_bytes(b"x"))
    assert mode(folder) == 0o755 and mode(folder / "f.png") == 0o644
    with scratch_folder(tmp_path / "x") as scratch:
        assert mode(scratch) == 0o755
    import torch
    from safetensors.torch import save_file

    weights = atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    assert mode(weights) == 0o644  # safetensors writes 0600 files of its own: corrected
    nested = atomic_folder(tmp_path / "ckpt", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp / "w.safetensors")))
    assert mode(nested / "w.safetensors") == 0o644
    umask(0o077)  # a stricter umask is respected too
    assert mode(atomic_write(tmp_path / "private", lambda tmp: tmp.write_text("s"))) == 0o600


def test_file_and_folder_are_fsynced_before_and_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = atomic_write(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"data"))
    assert len(synced) == 2 and Path(synced[0]).name.startswith(".out.bin.") and synced[1] == str(tmp_path)
    synced.clear()
    atomic_folder(tmp_path / "engine", lambda tmp: (tmp / "engine.plan").write_bytes(b"plan"))
    assert Path(synced[0]).name == "engine.plan" and synced[-1] == str(tmp_path)
    assert target.read_bytes() == b"data"


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space")])
def test_every_failure_leaves_the_old_file_and_no_temp(tmp_path: Path, error: BaseException) -> None:
    (tmp_path / "video.mp4").write_bytes(b"old")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "old.png").write_bytes(b"old")

    def fail(tmp: Path) -> None:
        (tmp / "part" if tmp.is_dir() else tmp).write_bytes(b"half")
        raise error

    expected = WriteError if isinstance(error, OSError) else type(error)
    with pytest.raises(expected) as raised:
        atomic_write(tmp_path / "video.mp4", fail)
    with pytest.raises(expected):
        atomic_folder(tmp_path / "frames", fail, replace=True)
    if isinstance(error, OSError):
        assert "no space left on the disk" in str(raised.value) and "free some space" in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "video.mp4"]
    assert (tmp_path / "video.mp4").read_bytes() == b"old" and os.listdir(tmp_path / "frames") == ["old.png"]


def test_atomic_folder_replaces_as_a_whole_or_refuses(tmp_path: Path) -> None:
    atomic_folder(tmp_path / "f", lambda tmp: (tmp / "a").write_text("1"))
    with pytest.raises(FileExistsError):
        atomic_folder(tmp_path / "f", lambda tmp: (tmp / "b").write_text("2"))
    atomic_folder(tmp_path / "f", lambda tmp: (tmp / "b").write_text("2"), replace=True)
    assert os.listdir(tmp_path / "f") == ["b"] and os.listdir(tmp_path) == ["f"]


def test_write_errors_say_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match="not a writable folder"):
        atomic_write(tmp_path / "file" / "out.txt", lambda tmp: tmp.write_text("y"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(WriteError, match="a folder of that name is in the way"):
        atomic_write(tmp_path / "dir", lambda tmp: tmp.write_text("y"))
    assert sorted(os.listdir(tmp_path)) == ["dir", "file"]


def test_file_digest_is_sha256(tmp_path: Path) -> None:
    import hashlib

    (tmp_path / "a").write_bytes(b"abc")
    assert file_digest(tmp_path / "a") == hashlib.sha256(b"abc").hexdigest()


LOCK_WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from ruyi_trt.files import file_lock
    target, log = Path(sys.argv[1]), Path(sys.argv[2])
    for _ in range(3):
        with file_lock(target):
            with open(log, "a") as f:
                f.write(f"in {os.getpid()}\\n")
            time.sleep(0.05)
            with open(log, "a") as f:
                f.write(f"out {os.getpid()}\\n")
""")


def test_lock_holders_never_overlap_across_processes(tmp_path: Path) -> None:
    log = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", LOCK_WORKER, str(tmp_path / "engine"), str(log)])
             for _ in range(3)]  # fmt: skip
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    lines = log.read_text().split()
    events = list(zip(lines[::2], lines[1::2], strict=True))
    assert len(events) == 18
    for enter, leave in zip(events[::2], events[1::2], strict=True):
        assert enter[0] == "in" and leave == ("out", enter[1])  # each entry is followed by its own exit
    assert os.listdir(tmp_path) == ["log"]  # the lock file is removed


def test_lock_is_reentrant_free_and_released_on_error(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), file_lock(tmp_path / "x"):
        raise KeyboardInterrupt
    with file_lock(tmp_path / "x"):  # taken again at once: the interrupted holder released it
        pass
    assert os.listdir(tmp_path) == []


RENAMES = {("os", "replace"), ("os", "rename"), ("tempfile", "mkstemp"), ("tempfile", "mkdtemp"), ("shutil", "move")}


def test_only_files_py_renames_files_into_place() -> None:
    """Every writer goes through files.py (mode, fsync, cleanup): no other module makes temp files or renames."""
    offenders = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        if rel == "files.py" or rel.startswith((".venv/", "tests/", "build/")) or "/." in "/" + rel:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (node.value.id, node.attr) in RENAMES:
                offenders.append(f"{rel}:{node.lineno} {node.value.id}.{node.attr}")
    assert not offenders, f"use ruyi_trt.files (atomic_write, atomic_folder, publish, scratch_folder): {offenders}"
