"""Files: atomic writes, safetensors for tensors, JSON for everything else. No pickle.

Every write goes to a temporary beside its destination (``.NAME.PID.XXXXXXXX.tmp``),
which is flushed to disk (``fsync``), given a plain file's or folder's permissions and
renamed onto the destination; the folder holding it is then flushed too. A folder, once
flushed, is renamed to ``.NAME.PID.XXXXXXXX.new``; replacing ``NAME`` then takes two
renames (the old one aside to ``.NAME.old``, the new one in). :func:`recover_directory`
finishes or undoes whatever a killed writer left, so that a reader always finds the newest
complete folder, and removes the temporaries of dead writers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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


def _leftovers(path: Path) -> list[tuple[Path, int | None]]:
    """Temporaries (``.NAME.PID.XXXXXXXX.tmp``) and finished, not yet renamed, folders
    (``.NAME.PID.XXXXXXXX.new``) of ``path`` beside it, with the writer's process id (None
    for the temporaries of versions that did not record it)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.(?:tmp|new)")
    found = []
    for item in path.parent.iterdir():
        match = pattern.fullmatch(item.name)
        if match:
            found.append((item, int(match.group(1)) if match.group(1) else None))
    return sorted(found)


def _alive(pid: int | None) -> bool:
    """Whether process ``pid`` runs on this machine (None: unknown, taken as dead)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(new: Path, path: Path) -> None:
    """Rename the finished folder ``new`` to ``path``: an existing ``path`` aside to
    ``.NAME.old`` first, removed last; the folder is flushed after every rename."""
    if path.exists() or path.is_symlink():
        old = _old(path)
        _remove(old)
        os.replace(path, old)
        _fsync(path.parent)
        os.replace(new, path)
        _fsync(path.parent)
        _remove(old)
    else:
        os.replace(new, path)
    _fsync(path.parent)


def recover_directory(path: str | Path) -> Path:
    """Make ``path`` the newest complete version of itself after a writer of
    :func:`atomic_directory` was killed, whenever that happened:

    * its temporary (``.NAME.PID.*.tmp``, not finished) is removed;
    * its finished folder (``.NAME.PID.*.new``, flushed to disk, killed before or between
      the renames) is renamed to ``path``, as the writer would have done;
    * otherwise, ``path`` missing and ``.NAME.old`` present: the old version is renamed
      back; ``path`` and ``.NAME.old`` present: the old one is removed.

    Nothing is touched while the writer (a process on this machine) still runs. Call it
    before reading or replacing ``path``; :func:`atomic_directory` does. Returns ``path``.
    """
    path = Path(path)
    try:
        leftovers = _leftovers(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):  # no folder to look in, or not ours
        return path
    if any(_alive(pid) for _, pid in leftovers):
        return path
    finished = [item for item, _ in leftovers if item.suffix == ".new"]
    for item, _ in leftovers:
        if item not in finished[-1:]:
            _remove(item)
    old = _old(path)
    if finished:
        _swap_in(finished[-1], path)
        _remove(old)  # killed between its two renames: the old one is aside already
    elif old.exists() or old.is_symlink():
        if path.exists() or path.is_symlink():
            _remove(old)
        else:
            os.replace(old, path)
        _fsync(path.parent)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False):
    """Yield a temporary directory beside ``path``; on success it is flushed to disk and
    renamed to ``path``. A crash at any point leaves ``path`` as it was, or the new folder
    finished beside it, which :func:`recover_directory` renames into place.

    An existing ``path`` (a folder or a file) is refused unless ``overwrite``; on error
    nothing is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_name(path), suffix=".tmp", dir=path.parent))
    new = tmp.with_suffix(".new")
    try:
        yield tmp
        _publish(tmp)
        _fsync_tree(tmp)
        os.replace(tmp, new)  # finished: from here on a crash leaves the new folder to recover
        _fsync(path.parent)
        _swap_in(new, path)
    except BaseException:
        _remove(tmp)
        _remove(new)
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
    recover_directory(path)  # the temporaries of killed writers
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
