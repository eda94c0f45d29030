"""The one atomic writer: every file nanoabsorber writes goes to a temporary file in the target's
folder and is renamed into place only when complete, so an interrupted write never leaves a
half-written file under the final name. Finished files get the permissions a plain `open(path,
"w")` would give them (0666 minus the umask), not mkstemp's private 0600, so a model or adapter
written by one user can be read by another in a shared folder.

    atomic_write(path, lambda f: f.write(b"..."))      # binary file object
    atomic_write_text(path, "text")
    atomic_save_safetensors(tensors, path, metadata)
    with atomic_path(path) as tmp: ...                  # anything that writes to a file name
    atomic_copy(src, dst)
    with atomic_dir(out_dir) as tmp: ...                # a whole folder, renamed into place
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file name beside `path`; when the block succeeds it is renamed to `path`
    (with plain-file permissions), when it fails it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path, write: Callable, mode: str = "wb") -> Path:
    """Call write(f) on a temporary file beside `path`, then rename it to `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), "w")


def atomic_save_safetensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    """safetensors' save_file to `path` atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def atomic_copy(src, dst) -> Path:
    with open(src, "rb") as s:
        return atomic_write(dst, lambda f: shutil.copyfileobj(s, f))


@contextlib.contextmanager
def atomic_dir(out_dir):
    """Yield a temporary sibling folder; on success it replaces `out_dir` (folders get 0777 minus
    the umask), on failure it is removed and `out_dir` is left as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
