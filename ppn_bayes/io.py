"""Files: atomic writes, safetensors for tensors, JSON for everything else. No pickle."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file", "atomic_write_text", "read_json", "FileFormatError"]


class FileFormatError(ValueError):
    """A file is missing, truncated, of another version, or for another model."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: Path) -> None:
    """Give a temporary file (0600) or folder (0700) the permissions of a plain one."""
    mode = 0o777 if path.is_dir() else 0o666
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False):
    """Yield a temporary directory beside ``path``; rename it to ``path`` on success.

    An existing ``path`` is refused unless ``overwrite``; on error nothing is left behind.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _publish(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside ``path`` to write a file to; on success it gets a plain
    file's permissions and is renamed to ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from ``path``, with an error naming ``what`` it should have been."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what}: no file at {path}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FileFormatError(f"{what}: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{what}: {path} does not hold a JSON object")
    return data
