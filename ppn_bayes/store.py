"""Token stores: training text of any size as memory-mapped shards, and the fit's data mixture.

A *token store* is a folder::

    manifest.json            format, tokenizer, source, shards (file, tokens, bytes, sha256)
    shard-00000.safetensors  one 1-D tensor ``tokens`` (uint16 when the vocabulary fits, else int32)
    shard-00001.safetensors
    ...

(the format is described in ``docs/formats.md``). :class:`TokenStoreWriter` writes it shard
by shard, each shard and then the manifest through a temporary file, ``fsync`` and a
rename, so a killed write leaves a store that ends at its last whole shard, and a writer
reopened with ``resume=True`` (and the same tokenizer and source) continues from there.
:class:`TokenStore` reads it: every shard is checked against the manifest (present, its
size, its SHA-256, its dtype and shape) and memory-mapped, so a store of 100M+ tokens costs
no memory.

For the fit, :func:`open_source` opens a text file (tokenised), a ``.safetensors`` token
file or a store as a :class:`TokenSource`, and :class:`Mixture` draws training batches
from several sources with mixing weights, a pure function of ``(seed, step)``: with one
source its rows are exactly :meth:`ppn_bayes.data.TokenBlocks.batch`'s. Each source and
each mixture has an :meth:`~TokenSource.identity` (kind, tokens, SHA-256, tokenizer) that a
checkpoint records; :func:`check_same_data` refuses a resume on other data.
:func:`parse_sources` reads the command line's ``PATH[:WEIGHT]`` specs and
:func:`open_mixture` puts the three together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .data import check_token_ids, tokenize
from .io import FileFormatError, atomic_file, read_json

__all__ = [
    "DEFAULT_SHARD_TOKENS", "FORMAT", "FORMAT_VERSION", "Mixture", "TokenSource", "TokenStore",
    "TokenStoreWriter", "check_same_data", "open_mixture", "open_source", "parse_sources",
    "read_manifest", "same_tokenizer", "store_dtype", "tokenizer_identity", "write_store",
]

FORMAT = "ppn_bayes.token-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MiB of uint16 a shard
_SHARD = re.compile(r"shard-(\d{5,})\.safetensors")
# atomic_file's temporaries: ".<name>.<random>.tmp" beside the file.
_TEMPORARY = re.compile(r"\.(shard-\d{5,}\.safetensors|manifest\.json)\..+\.tmp")
# safetensors dtype names of integer tensors -> little-endian numpy dtypes
_SAFETENSORS_DTYPES = {"U8": "<u1", "I8": "<i1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4",
                       "U64": "<u8", "I64": "<i8"}
_STORE_DTYPES = {"uint16": ("U16", np.dtype("<u2")), "int32": ("I32", np.dtype("<i4"))}
_HASH_CHUNK = 1 << 24


# -- identities -------------------------------------------------------------------------------


def tokenizer_identity(tokenizer) -> str:
    """``"<name> sha256:<hex>"``: the tokenizer's name and a SHA-256 of its vocabulary.

    The vocabulary is ``tokenizer.get_vocab()`` for a Hugging Face tokenizer (added tokens
    included) and the alphabet of a :class:`~ppn_bayes.data.CharTokenizer`, hashed as a
    JSON list of ``[token, id]`` pairs in id order. The name (``name_or_path``, or the
    class name) only helps a reader: :func:`same_tokenizer` compares the hashes, so a model
    folder moved elsewhere keeps its identity.
    """
    if hasattr(tokenizer, "get_vocab"):
        vocab = tokenizer.get_vocab()
    elif isinstance(getattr(tokenizer, "alphabet", None), str):
        vocab = {c: i for i, c in enumerate(tokenizer.alphabet)}
    else:
        raise TypeError(f"{type(tokenizer).__name__} has neither get_vocab() nor an alphabet: "
                        "cannot identify its vocabulary")
    pairs = sorted(([str(token), int(i)] for token, i in vocab.items()), key=lambda p: (p[1], p[0]))
    digest = hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    return f"{name} sha256:{digest}"


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two :func:`tokenizer_identity` strings name the same vocabulary (their
    ``sha256:`` parts agree; strings without one must be equal)."""
    hashes = [s.rpartition("sha256:")[2] if "sha256:" in s else None for s in (a, b)]
    return hashes[0] == hashes[1] if None not in hashes else a == b


def store_dtype(vocab_size: int) -> str:
    """``"uint16"`` when ids ``0 .. vocab_size - 1`` fit in 16 bits, else ``"int32"``."""
    if vocab_size < 1 or vocab_size > 2**31:
        raise ValueError(f"vocab_size must be between 1 and 2**31, got {vocab_size}")
    return "uint16" if vocab_size <= 65536 else "int32"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_tensor(tokens: torch.Tensor) -> str:
    array = np.ascontiguousarray(tokens.detach().cpu().long().numpy())
    return hashlib.sha256(array.tobytes()).hexdigest()


# -- safetensors files, memory-mapped ------------------------------------------------------------


def _map_tokens(path: Path, what: str, *, dtype: np.dtype | None = None,
                count: int | None = None) -> np.ndarray:
    """The 1-D tensor ``tokens`` of the safetensors file ``path`` as a read-only memmap,
    after checking its header (one integer tensor ``tokens``, 1-D, its byte range the rest
    of the file) and, when given, its ``dtype`` and element ``count``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(f"{what}: {path} is truncated (no safetensors header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100_000_000):
            raise FileFormatError(f"{what}: {path} is truncated or not safetensors (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FileFormatError(f"{what}: {path} has no valid safetensors header") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{what}: {path} has no valid safetensors header")
    entry = header.get("tokens")
    tensors = sorted(k for k in header if k != "__metadata__")
    if not isinstance(entry, dict) or tensors != ["tokens"]:
        raise FileFormatError(f"{what}: {path} must hold exactly one tensor named 'tokens', holds {tensors}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if entry.get("dtype") not in _SAFETENSORS_DTYPES:
        raise FileFormatError(f"{what}: {path}'s tokens are {entry.get('dtype')}, not integers")
    found = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
    if dtype is not None and found != dtype:
        raise FileFormatError(f"{what}: {path} holds {entry['dtype']} tokens, the manifest says {dtype.name}")
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int)):
        raise FileFormatError(f"{what}: {path}'s tokens must be 1-D, got shape {shape}")
    if count is not None and shape[0] != count:
        raise FileFormatError(f"{what}: {path} holds {shape[0]} tokens, the manifest says {count}")
    start = 8 + length
    if (not isinstance(offsets, list) or len(offsets) != 2 or offsets[0] != 0
            or offsets[1] != shape[0] * found.itemsize or start + offsets[1] != size):
        raise FileFormatError(f"{what}: {path} is truncated or inconsistent (data offsets {offsets}, "
                              f"{shape[0]} tokens of {found.itemsize} bytes, file of {size} bytes)")
    if shape[0] == 0:
        return np.zeros(0, dtype=found)
    return np.memmap(path, dtype=found, mode="r", offset=start, shape=(shape[0],))


def _shard_bytes(tokens: np.ndarray) -> bytes:
    from safetensors.numpy import save

    return save({"tokens": tokens})


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """``data`` to ``path``: a temporary file, written and fsynced, renamed into place; then
    the folder fsynced so that the rename survives a crash."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    _fsync_directory(path.parent)


# -- sources --------------------------------------------------------------------------------------


class TokenSource:
    """One token stream ``[N]`` held in one or more 1-D integer arrays (memory-mapped shards,
    or an in-memory tensor), read in windows.

    ``identity`` is what :meth:`identity` returns: ``kind``, ``path``, ``tokens``, ``sha256``
    and ``tokenizer`` (``None`` where unknown). Build one with :func:`open_source`,
    :meth:`from_tensor` or :class:`TokenStore`.
    """

    def __init__(self, parts: Sequence[np.ndarray], identity: dict):
        self._parts = [p for p in parts if len(p)]
        self._ends = np.cumsum([len(p) for p in self._parts], dtype=np.int64)  # [S]
        self._identity = dict(identity)

    @classmethod
    def from_tensor(cls, tokens: torch.Tensor, *, kind: str = "tensor", path: str | None = None,
                    sha256: str | None = None, tokenizer: str | None = None) -> "TokenSource":
        """A source over the 1-D tensor ``tokens`` (read as int64, on the CPU)."""
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be one 1-D stream, got shape {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
        tokens = tokens.detach().cpu().long().contiguous()
        identity = {"kind": kind, "path": path, "tokens": int(tokens.numel()),
                    "sha256": sha256 or _sha256_tensor(tokens), "tokenizer": tokenizer}
        return cls([tokens.numpy()], identity)

    def numel(self) -> int:
        """Tokens in the stream."""
        return int(self._ends[-1]) if len(self._ends) else 0

    def identity(self) -> dict:
        """``{kind, path, tokens, sha256, tokenizer}``: what a checkpoint records of this data."""
        return dict(self._identity)

    def window(self, start: int, length: int) -> torch.Tensor:
        """Tokens ``start .. start + length - 1`` as a LongTensor ``[length]`` (a window may
        span shards)."""
        if length < 0 or start < 0 or start + length > self.numel():
            raise IndexError(f"window [{start}, {start + length}) is outside the {self.numel()} tokens")
        pieces, position = [], start
        part = int(np.searchsorted(self._ends, start, side="right"))
        while position < start + length:
            begin = int(self._ends[part - 1]) if part else 0
            stop = min(start + length, int(self._ends[part]))
            pieces.append(self._parts[part][position - begin:stop - begin])
            position, part = stop, part + 1
        joined = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(joined.astype(np.int64))

    def rows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """Windows ``[len(starts), length]`` starting at ``starts [R]``."""
        if len(self._parts) == 1:  # one gather, as TokenBlocks.batch indexes its tensor
            index = starts.numpy()[:, None] + np.arange(length)  # [R, length]
            return torch.from_numpy(self._parts[0][index].astype(np.int64))
        if not len(starts):
            return torch.zeros(0, length, dtype=torch.long)
        return torch.stack([self.window(int(s), length) for s in starts])

    def id_range(self) -> tuple[int, int] | None:
        """``(smallest, largest)`` id in the stream (one pass over it), ``None`` when empty."""
        if not self._parts:
            return None
        return (min(int(p.min()) for p in self._parts), max(int(p.max()) for p in self._parts))

    def check_ids(self, vocab_size: int) -> None:
        """Raise ``ValueError`` naming the source when an id falls outside ``[0, vocab_size)``."""
        extremes = self.id_range()
        if extremes is not None:
            check_token_ids(torch.tensor(extremes), vocab_size,
                            what=f"{self._identity.get('path') or self._identity['kind']}")

    def tokens(self) -> torch.Tensor:
        """The whole stream as one LongTensor ``[N]`` in memory."""
        return self.window(0, self.numel())


class TokenStore(TokenSource):
    """A token store folder, opened for reading (see the module's docstring).

    On opening, the manifest and every shard are checked: the shard is present, of the
    size the manifest gives, with its SHA-256 (``verify=False`` skips the hashing, the
    slow part: a second per ~1 GB) and holds a 1-D ``tokens`` tensor of the manifest's dtype
    and count. Each failure is a :class:`~ppn_bayes.io.FileFormatError` naming the shard
    and the problem. A store whose writer has not finished (``complete`` false) is refused
    unless ``allow_incomplete``.
    """

    def __init__(self, path: str | Path, *, verify: bool = True, allow_incomplete: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest["complete"] and not allow_incomplete:
            raise FileFormatError(
                f"token store {self.path} is incomplete ({self.manifest['total_tokens']} tokens in "
                f"{len(self.manifest['shards'])} shards): its writer stopped; resume it (teacher-text --resume)"
            )
        dtype = _STORE_DTYPES[self.manifest["dtype"]][1]
        parts = []
        for shard in self.manifest["shards"]:
            file = self.path / shard["file"]
            what = f"token store {self.path}, shard {shard['file']}"
            if not file.is_file():
                raise FileFormatError(f"{what}: the file is missing")
            size = file.stat().st_size
            if size != shard["bytes"]:
                raise FileFormatError(f"{what}: {size} bytes, the manifest says {shard['bytes']} (truncated or "
                                      "replaced)")
            if verify and _sha256_file(file) != shard["sha256"]:
                raise FileFormatError(f"{what}: its SHA-256 differs from the manifest's (corrupt)")
            parts.append(_map_tokens(file, what, dtype=dtype, count=shard["tokens"]))
        hashes = hashlib.sha256("".join(s["sha256"] for s in self.manifest["shards"]).encode()).hexdigest()
        super().__init__(parts, {"kind": "store", "path": str(self.path), "tokens": self.manifest["total_tokens"],
                                 "sha256": hashes, "tokenizer": self.manifest["tokenizer"]})

    @property
    def tokenizer(self) -> str:
        """The tokenizer identity the store was written with (:func:`tokenizer_identity`)."""
        return self.manifest["tokenizer"]

    @property
    def vocab_size(self) -> int:
        """The vocabulary the store's ids come from."""
        return self.manifest["vocab_size"]

    @property
    def source(self) -> dict:
        """What made the store (free JSON: the model, the corpus, settings, statistics)."""
        return self.manifest["source"]


def read_manifest(path: str | Path) -> dict:
    """The checked ``manifest.json`` of the store folder ``path`` (a
    :class:`~ppn_bayes.io.FileFormatError` naming what is wrong)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no token store folder at {path}")
    manifest = read_json(path / MANIFEST, f"token store {path}")
    what = f"token store {path}: manifest.json"
    if manifest.get("format") != FORMAT:
        raise FileFormatError(f"{what} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FileFormatError(f"{what} has format_version {manifest.get('format_version')!r}; this ppn_bayes "
                              f"reads {FORMAT_VERSION}")
    kinds = {"dtype": str, "vocab_size": int, "tokenizer": str, "source": dict, "total_tokens": int,
             "complete": bool, "shards": list, "shard_tokens": int}
    for key, kind in kinds.items():
        if not isinstance(manifest.get(key), kind):
            raise FileFormatError(f"{what} lacks {key} (a {kind.__name__})")
    if manifest["dtype"] not in _STORE_DTYPES:
        raise FileFormatError(f"{what}: dtype {manifest['dtype']!r} is not one of {sorted(_STORE_DTYPES)}")
    if manifest["dtype"] != store_dtype(manifest["vocab_size"]):
        raise FileFormatError(f"{what}: dtype {manifest['dtype']} does not suit a vocabulary of "
                              f"{manifest['vocab_size']}")
    for i, shard in enumerate(manifest["shards"]):
        if not (isinstance(shard, dict) and shard.get("file") == f"shard-{i:05d}.safetensors"
                and all(isinstance(shard.get(k), int) and shard[k] >= 0 for k in ("tokens", "bytes"))
                and isinstance(shard.get("sha256"), str)):
            raise FileFormatError(f"{what}: shard entry {i} must be {{file: shard-{i:05d}.safetensors, tokens, "
                                  f"bytes, sha256}}, got {shard}")
    if sum(s["tokens"] for s in manifest["shards"]) != manifest["total_tokens"]:
        raise FileFormatError(f"{what}: total_tokens {manifest['total_tokens']} is not the shards' sum")
    return manifest


def open_source(path: str | Path, tokenizer=None, *, vocab_size: int | None = None,
                verify: bool = True) -> TokenSource:
    """A :class:`TokenSource` for ``path``: a token store folder, a ``.safetensors`` file
    with a 1-D integer ``tokens`` tensor (memory-mapped), or a text file (tokenised with
    ``tokenizer``).

    With ``tokenizer``, a store written with another tokenizer is refused (a
    :class:`~ppn_bayes.io.FileFormatError` naming both); with ``vocab_size``, token ids
    outside ``[0, vocab_size)`` are refused (a ``ValueError`` naming the source).
    ``verify`` is :class:`TokenStore`'s.
    """
    path = Path(path)
    expected = tokenizer_identity(tokenizer) if tokenizer is not None else None
    if path.is_dir():
        source = TokenStore(path, verify=verify)
        if expected is not None and not same_tokenizer(source.tokenizer, expected):
            raise FileFormatError(f"token store {path} was written with tokenizer {source.tokenizer}; "
                                  f"the LM's tokenizer is {expected}")
    elif not path.is_file():
        raise FileNotFoundError(f"no data file or token store at {path}")
    elif path.suffix == ".safetensors":
        array = _map_tokens(path, "token file")
        source = TokenSource([array], {"kind": "tokens", "path": str(path), "tokens": len(array),
                                       "sha256": _sha256_file(path), "tokenizer": None})
    else:
        if tokenizer is None:
            raise ValueError(f"{path} is text: a tokenizer is needed to read it")
        source = TokenSource.from_tensor(tokenize(path.read_text(encoding="utf-8"), tokenizer), kind="text",
                                         path=str(path), sha256=_sha256_file(path), tokenizer=expected)
    if vocab_size is not None:
        source.check_ids(vocab_size)
    return source


# -- writing ---------------------------------------------------------------------------------------


def _differences(stored, given, where: str) -> list[str]:
    if isinstance(stored, dict) and isinstance(given, dict):
        found = []
        for key in sorted(set(stored) | set(given), key=str):
            found += _differences(stored.get(key), given.get(key), f"{where}.{key}" if where else str(key))
        return found
    return [] if stored == given else [f"{where}: stored {stored!r}, given {given!r}"]


class TokenStoreWriter:
    """Write a token store shard by shard; resumable.

    :meth:`append` buffers whole pieces of tokens (a generation round, say); once
    ``shard_tokens`` or more are buffered they are written as the next shard (so a shard
    holds whole pieces, ``shard_tokens`` or a little more), then the manifest records it
    with the ``marker`` given with its last piece: where a resumed writer's caller should
    continue. :meth:`close` writes the rest and marks the store complete; leaving a ``with``
    block by an exception does not (the store stays resumable at its last shard).

    Parameters
    ----------
    path
        The store folder. Nothing is written before the first shard.
    vocab_size
        Ids are in ``[0, vocab_size)``; shards are uint16 when it is at most 65536, else int32.
    tokenizer
        The tokenizer's identity, :func:`tokenizer_identity`.
    source
        What makes the store (JSON: model, corpus, settings). Its key ``stats`` is the one
        part that may change as the store grows (:meth:`append` updates it).
    shard_tokens
        Tokens a shard holds (at least).
    resume
        Continue an existing, incomplete store after its last whole shard; it must have the
        same vocabulary, tokenizer, ``source`` (but ``stats``) and ``shard_tokens``, else a
        ``ValueError`` names each difference. Stray files of a killed write (temporaries, a
        shard the manifest does not list) are removed. A complete store is left as it is
        (:attr:`complete`); no store at ``path`` starts a new one.
    overwrite
        Replace an existing store (removed when the first shard is written).
    """

    def __init__(self, path: str | Path, *, vocab_size: int, tokenizer: str, source: dict,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be at least 1, got {shard_tokens}")
        if not isinstance(tokenizer, str) or not tokenizer:
            raise ValueError("tokenizer must be a non-empty identity string (tokenizer_identity)")
        source = json.loads(json.dumps(source))  # plain JSON, or a TypeError now rather than later
        self.dtype = store_dtype(vocab_size)
        self._numpy_dtype = _STORE_DTYPES[self.dtype][1]
        self.manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": self.dtype,
                         "vocab_size": int(vocab_size), "tokenizer": tokenizer, "source": source,
                         "shard_tokens": int(shard_tokens), "total_tokens": 0, "complete": False, "shards": []}
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._pending: dict = {}
        self._replace = False
        if self.path.exists():
            if not self.path.is_dir():
                raise FileExistsError(f"{self.path} exists and is not a folder: a token store is a folder")
            has_manifest = (self.path / MANIFEST).exists()
            files = [f.name for f in self.path.iterdir()]
            leftovers = all(_TEMPORARY.fullmatch(f) or _SHARD.fullmatch(f) for f in files)
            if not has_manifest and not leftovers:
                raise FileExistsError(f"{self.path} is a non-empty folder without a token store's manifest.json; "
                                      "choose another folder")
            if not has_manifest and files and not (resume or overwrite):
                raise FileExistsError(f"{self.path} holds the shards of a write killed before its first manifest; "
                                      "pass resume=True (--resume) or overwrite=True (--overwrite) to start over")
            if not has_manifest:  # nothing of a store, or leftovers that a resume starts over from
                self._replace = bool(files)
            elif resume:
                self._resume(read_manifest(self.path))
            elif not overwrite:
                raise FileExistsError(f"token store {self.path} exists; pass resume=True (--resume) to continue it "
                                      "or overwrite=True (--overwrite) to replace it")
            else:
                self._replace = True

    def _resume(self, stored: dict) -> None:
        mine = self.manifest
        differences = []
        for key in ("dtype", "vocab_size", "shard_tokens"):
            differences += _differences(stored[key], mine[key], key)
        if not same_tokenizer(stored["tokenizer"], mine["tokenizer"]):
            differences.append(f"tokenizer: stored {stored['tokenizer']}, given {mine['tokenizer']}")
        differences += _differences({k: v for k, v in stored["source"].items() if k != "stats"},
                                    {k: v for k, v in mine["source"].items() if k != "stats"}, "source")
        if differences:
            raise ValueError(f"token store {self.path} was written with other settings; cannot resume it: "
                             + "; ".join(differences))
        listed = {s["file"] for s in stored["shards"]}
        for file in self.path.iterdir():  # a killed write's leftovers
            if _TEMPORARY.fullmatch(file.name) or (_SHARD.fullmatch(file.name) and file.name not in listed):
                file.unlink()
        for shard in stored["shards"]:
            file = self.path / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["bytes"]:
                raise FileFormatError(f"token store {self.path}, shard {shard['file']}: missing or of another size "
                                      "than the manifest says; cannot resume it")
        self.manifest = stored

    @property
    def complete(self) -> bool:
        """Whether the store is finished (:meth:`close` was called, now or by an earlier run)."""
        return self.manifest["complete"]

    @property
    def tokens(self) -> int:
        """Tokens written in shards plus tokens buffered."""
        return self.manifest["total_tokens"] + self._buffered

    @property
    def marker(self):
        """The ``marker`` of the last shard written (``None`` before the first)."""
        shards = self.manifest["shards"]
        return shards[-1].get("marker") if shards else None

    @property
    def stats(self) -> dict | None:
        """``source["stats"]`` as of the last shard written."""
        return self.manifest["source"].get("stats")

    def append(self, tokens, *, marker=None, stats: dict | None = None) -> None:
        """Buffer ``tokens [n]``; write a shard once ``shard_tokens`` are buffered. The shard
        records ``marker`` (JSON) and ``source["stats"]`` becomes ``stats`` (JSON) when given."""
        if self.complete:
            raise ValueError(f"token store {self.path} is complete; nothing more can be appended")
        array = np.asarray(torch.as_tensor(tokens).detach().cpu().numpy())
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer stream, got {array.dtype} of shape {array.shape}")
        if len(array):
            check_token_ids(torch.tensor([int(array.min()), int(array.max())]), self.manifest["vocab_size"],
                            what=f"tokens appended to {self.path}")
        self._buffer.append(array.astype(self._numpy_dtype))
        self._buffered += len(array)
        self._pending = {"marker": json.loads(json.dumps(marker))}
        if stats is not None:
            self._pending["stats"] = json.loads(json.dumps(stats))
        if self._buffered >= self.manifest["shard_tokens"]:
            self.flush()

    def flush(self) -> None:
        """Write the buffered tokens as the next shard (nothing when none are buffered)."""
        if not self._buffered:
            return
        self._start()
        shards = self.manifest["shards"]
        name = f"shard-{len(shards):05d}.safetensors"
        data = _shard_bytes(np.concatenate(self._buffer))
        _write_durably(self.path / name, data)
        shard = {"file": name, "tokens": self._buffered, "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest()}
        if self._pending.get("marker") is not None:
            shard["marker"] = self._pending["marker"]
        if "stats" in self._pending:
            self.manifest["source"]["stats"] = self._pending["stats"]
        shards.append(shard)
        self.manifest["total_tokens"] += self._buffered
        self._buffer, self._buffered, self._pending = [], 0, {}
        self._write_manifest()

    def close(self) -> None:
        """Write what is buffered and mark the store complete."""
        if self.complete:
            return
        self.flush()
        self._start()
        self.manifest["complete"] = True
        self._write_manifest()

    def _start(self) -> None:
        """Before the first write: replace an old store (manifest first, so that no manifest
        ever lists a missing shard), create the folder."""
        if self._replace:
            (self.path / MANIFEST).unlink(missing_ok=True)
            for file in self.path.iterdir():
                if _SHARD.fullmatch(file.name) or _TEMPORARY.fullmatch(file.name):
                    file.unlink()
            self._replace = False
        self.path.mkdir(parents=True, exist_ok=True)

    def _write_manifest(self) -> None:
        _write_durably(self.path / MANIFEST, (json.dumps(self.manifest, indent=1) + "\n").encode())

    def __enter__(self) -> "TokenStoreWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()


def write_store(path: str | Path, tokens: torch.Tensor, *, vocab_size: int, tokenizer: str,
                source: dict | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                overwrite: bool = False) -> TokenStore:
    """Write ``tokens [N]`` as a complete store of shards of exactly ``shard_tokens`` tokens
    (the last one shorter); return it opened. Ids are checked before anything is written."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty 1-D stream, got shape {tuple(tokens.shape)}")
    check_token_ids(tokens, vocab_size, what=f"tokens for {path}")
    with TokenStoreWriter(path, vocab_size=vocab_size, tokenizer=tokenizer, source=source or {},
                          shard_tokens=shard_tokens, overwrite=overwrite) as writer:
        for start in range(0, tokens.numel(), shard_tokens):
            writer.append(tokens[start:start + shard_tokens])
    return TokenStore(path)


# -- mixing ---------------------------------------------------------------------------------------


def parse_sources(specs: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """``(paths, weights)`` from command-line specs ``PATH[:WEIGHT]``.

    The text after the *last* ``:`` is the weight when Python's ``float`` reads it
    (``0.5``, ``1e-3``, also ``nan`` and ``-1``, which :class:`Mixture` then refuses);
    otherwise the whole spec is the path. So ``C:\\data\\a.txt`` and ``gen:v2/`` are plain
    paths, while a path that itself ends in ``:<number>`` needs its weight written out:
    ``run:3:1``. Give a weight to every source or to none (``weights`` is then ``None``:
    equal weights).
    """
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ValueError("no data sources given")
    paths, weights = [], []
    for spec in specs:
        path, colon, tail = spec.rpartition(":")
        weight = None
        if colon:
            try:
                weight = float(tail)
            except ValueError:
                path = spec
        else:
            path = spec
        if not path:
            raise ValueError(f"data spec {spec!r} gives a weight but names no source")
        paths.append(path)
        weights.append(weight)
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        missing = [p for p, w in zip(paths, weights) if w is None]
        raise ValueError(f"give a weight to every data source or to none; without one: {missing}")
    return paths, (weights if all(given) else None)


class Mixture:
    """Training batches drawn from several sources (:class:`TokenSource`) with mixing weights.

    Each row of a batch picks its source with probability ``weight / sum(weights)`` and a
    uniform window of ``seq_len`` tokens within it. ``sources`` may also be 1-D token
    tensors; ``weights=None`` weighs them equally.
    """

    def __init__(self, sources: Sequence[TokenSource | torch.Tensor], weights: Sequence[float] | None = None,
                 seq_len: int = 256, seed: int = 0):
        sources = [s if isinstance(s, TokenSource) else TokenSource.from_tensor(s) for s in sources]
        if not sources:
            raise ValueError("a mixture needs at least one source")
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) > len(sources):
            raise ValueError(f"{len(weights)} weights for {len(sources)} sources: weight {len(sources) + 1} "
                             f"({weights[len(sources)]}) names no source")
        if len(weights) < len(sources):
            raise ValueError(f"{len(weights)} weights for {len(sources)} sources: source {len(weights) + 1} "
                             f"({_name(sources[len(weights)])}) has no weight")
        for source, weight in zip(sources, weights):
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"the weight of {_name(source)} must be a finite number >= 0, got {weight}")
            if source.numel() < seq_len:
                raise ValueError(f"{_name(source)} has {source.numel()} tokens, fewer than one window of {seq_len}")
        tokenizers = [(s.identity().get("tokenizer"), _name(s)) for s in sources if s.identity().get("tokenizer")]
        for tokenizer, name in tokenizers[1:]:
            if not same_tokenizer(tokenizer, tokenizers[0][0]):
                raise ValueError(f"{name} was tokenised with {tokenizer}, {tokenizers[0][1]} with {tokenizers[0][0]}: "
                                 "a mixture's sources must share one tokenizer")
        total = sum(weights)
        if not total > 0:
            raise ValueError(f"the mixing weights sum to {total}; at least one must be positive")
        self.sources = sources
        self.weights = [w / total for w in weights]
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self._probabilities = torch.tensor(self.weights, dtype=torch.float64)

    def numel(self) -> int:
        """Tokens in all sources together."""
        return sum(s.numel() for s in self.sources)

    def identity(self) -> dict:
        """``{"kind": "mixture", "sources": [source identity + weight (normalised)]}``."""
        return {"kind": "mixture",
                "sources": [s.identity() | {"weight": w} for s, w in zip(self.sources, self.weights)]}

    def batch(self, step: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Windows ``[batch_size, seq_len]`` for ``step``, a pure function of ``(seed, step)``;
        under several processes each rank takes its own rows of the same global batch of
        ``batch_size * world_size`` rows.

        One generator, seeded as :meth:`~ppn_bayes.data.TokenBlocks.batch` seeds its own,
        draws a start for every global row in each source in turn, then (with more than
        one source) each row's source. With a single source the first draw is
        ``TokenBlocks``'s and nothing else is drawn, so the rows are ``TokenBlocks``'s.
        """
        starts, choice = self._draw(step, batch_size, rank, world_size)
        if len(self.sources) == 1:
            return self.sources[0].rows(starts[0], self.seq_len)  # [B, T]
        out = torch.empty(batch_size, self.seq_len, dtype=torch.long)
        for i, source in enumerate(self.sources):
            picked = (choice == i).nonzero().flatten()
            if len(picked):  # index_copy_: CPU index_put_ is orders of magnitude slower here
                out.index_copy_(0, picked, source.rows(starts[i][picked], self.seq_len))
        return out  # [B, T]

    def sources_drawn(self, step: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Which source each row of :meth:`batch` comes from: indices ``[batch_size]``."""
        return self._draw(step, batch_size, rank, world_size)[1]

    def _draw(self, step: int, batch_size: int, rank: int, world_size: int):
        """``(starts, choice)``: this rank's rows' start in every source (``[batch_size]``
        each) and the source each row reads (``[batch_size]``)."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, "
                             f"{world_size}")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows = batch_size * world_size
        starts = [torch.randint(0, s.numel() - self.seq_len + 1, (rows,), generator=generator)
                  for s in self.sources]  # each [rows]
        if len(self.sources) > 1:
            choice = torch.multinomial(self._probabilities, rows, replacement=True, generator=generator)
        else:
            choice = torch.zeros(rows, dtype=torch.long)
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        return [s[mine] for s in starts], choice[mine]


def _name(source: TokenSource) -> str:
    identity = source.identity()
    return identity.get("path") or f"a {identity['kind']} of {identity['tokens']} tokens"


def open_mixture(specs: Sequence[str], tokenizer=None, *, seq_len: int, seed: int = 0,
                 vocab_size: int | None = None, verify: bool = True) -> Mixture:
    """A :class:`Mixture` from command-line specs (:func:`parse_sources`), each source
    opened with :func:`open_source` (tokenizer and id checks) and checked against
    ``seq_len``. Every spec is parsed and checked before any source is read."""
    paths, weights = parse_sources(specs)
    if weights is not None:  # the weights' errors before minutes of tokenising
        for path, weight in zip(paths, weights):
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"the weight of {path} must be a finite number >= 0, got {weight}")
        if not sum(weights) > 0:
            raise ValueError(f"the mixing weights sum to {sum(weights)}; at least one must be positive")
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"no data file or token store at {path}")
    sources = [open_source(p, tokenizer, vocab_size=vocab_size, verify=verify) for p in paths]
    return Mixture(sources, weights, seq_len=seq_len, seed=seed)


def check_same_data(recorded: dict, current: dict) -> None:
    """Raise ``ValueError`` naming each difference when ``current`` (an :meth:`identity`)
    is other data than ``recorded``: another number of sources, or a source of another
    kind, token count, SHA-256, tokenizer or weight. Paths are not compared (a moved file
    is the same data)."""
    def essentials(identity: dict) -> list[dict]:
        sources = identity["sources"] if identity.get("kind") == "mixture" else [identity | {"weight": 1.0}]
        return [{k: s.get(k) for k in ("kind", "tokens", "sha256", "weight")}
                | {"tokenizer": (s.get("tokenizer") or "").rpartition("sha256:")[2] or None} for s in sources]

    old, new = essentials(recorded), essentials(current)
    if len(old) != len(new):
        raise ValueError(f"the data has {len(new)} sources; the checkpoint was fitted on {len(old)}")
    differences = []
    for i, (a, b) in enumerate(zip(old, new)):
        differences += _differences(a, b, f"source {i + 1}")
    if differences:
        raise ValueError("the data differs from the data the checkpoint was fitted on: " + "; ".join(differences))
