"""Files: atomic writes, safetensors for tensors, JSON for everything else. No pickle.

Every write goes to a temporary beside its destination (``.NAME.PID.XXXX.tmp``), which is
flushed to disk (``fsync``), given a plain file's or folder's permissions and renamed onto
the destination; the folder holding it is then flushed too. Replacing a folder takes two
renames (the old one aside to ``.NAME.old``, the new one in); :func:`recover_directory`
undoes a crash between them and removes the temporaries of dead writers, so a reader
always finds the newest complete folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file", "atomic_write_text", "read_json", "recover_directory",
           "FileFormatError"]


class FileFormatError(ValueError):
    """A file is missing, truncated, of another version, or for another model."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: Path) -> None:
    """Give a temporary file (0600) or folder (0700), and everything in a folder, the
    permissions of a plain one (0666 or 0777 less the umask), whoever created it."""
    mask = _umask()
    paths = [path]
    if path.is_dir():
        paths += sorted(path.rglob("*"))
    for item in paths:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def _fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder under ``path``, ``path`` last."""
    if path.is_dir():
        for item in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if not item.is_symlink():
                _fsync(item)
    _fsync(path)


def _remove(path: Path) -> None:
    """Remove a file or a folder, whichever ``path`` is; nothing when it is absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _temporary_name(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _writer_alive(tmp: Path, path: Path) -> bool:
    """Whether the process that made temporary ``tmp`` of ``path`` still runs here.
    Temporaries without a process id (of older versions) count as dead."""
    middle = tmp.name[len(path.name) + 2:]
    pid = middle.split(".", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_directory(path: str | Path) -> Path:
    """Make ``path`` the newest complete version of itself, after a crash of a writer.

    * ``path`` missing but ``.NAME.old`` present (a crash between the two renames of a
      replacement): the old version is renamed back;
    * ``path`` present and ``.NAME.old`` too (a crash before the old one was removed): the
      old one is removed;
    * temporaries ``.NAME.PID.*.tmp`` of processes no longer running are removed.

    Temporaries of a writer still running are left alone (and then so is ``.NAME.old``).
    Call it before reading or replacing ``path``; returns ``path``.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return path
    live = False
    for tmp in parent.glob(f".{path.name}.*.tmp"):
        if _writer_alive(tmp, path):
            live = True
        else:
            _remove(tmp)
    old = _old(path)
    if not live and (old.exists() or old.is_symlink()):
        if path.exists():
            _remove(old)
        else:
            os.replace(old, path)
        _fsync(parent)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False):
    """Yield a temporary directory beside ``path``; on success it is flushed to disk and
    renamed to ``path`` (a crash at any point leaves ``path``, old or new, for
    :func:`recover_directory` to find).

    An existing ``path`` (a folder or a file) is refused unless ``overwrite``; on error
    nothing is left behind.
    """
    path = Path(path)
    recover_directory(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_name(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _publish(tmp)
        _fsync_tree(tmp)
        if path.exists() or path.is_symlink():
            old = _old(path)
            _remove(old)
            os.replace(path, old)
            _fsync(path.parent)
            os.replace(tmp, path)
            _fsync(path.parent)
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside ``path`` to write a file to; on success it is flushed
    to disk, gets a plain file's permissions and is renamed to ``path`` (and the folder
    flushed); on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file")
    fd, tmp = tempfile.mkstemp(prefix=_temporary_name(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _publish(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file, fsync and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
