"""nanoabsorber.io: the one atomic writer (nothing half-written, plain-file permissions)."""
import os
import stat

import pytest
import torch

from nanoabsorber.io import atomic_copy, atomic_dir, atomic_save_safetensors, atomic_write, atomic_write_text


def mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_plain_permissions_under_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "hi")
        atomic_save_safetensors({"x": torch.zeros(2)}, tmp_path / "t.safetensors")
        atomic_copy(tmp_path / "a.txt", tmp_path / "sub" / "b.txt")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
    for p in ("a.txt", "t.safetensors", "sub/b.txt"):
        assert mode(tmp_path / p) == 0o666 & ~umask, p
    assert mode(tmp_path / "d") == 0o777 & ~umask
    assert (tmp_path / "sub" / "b.txt").read_text() == "hi"


def test_an_interrupted_write_leaves_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")

    def boom(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(p, boom)
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_an_interrupted_folder_leaves_the_old_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as d:
            (d / "new").write_text("2")
            raise RuntimeError("stop")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d"] and (tmp_path / "d" / "keep").exists()
    with atomic_dir(tmp_path / "d") as d:
        (d / "new").write_text("2")
    assert sorted(x.name for x in (tmp_path / "d").iterdir()) == ["new"]
