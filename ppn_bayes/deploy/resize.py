"""Resizing without the full model: the ranked checkpoint and slice-wise reads.

Because the ranking is global and nested, sorting each layer's attention units and MLP
units by their rank (a permutation of rows and columns that leaves the LM's function
unchanged) makes the units a layer keeps at *any* size a prefix of that layer's tensors.
:func:`export_ranked` writes such a **ranked checkpoint**::

    ranked.json           format, version, the LM's config, architecture, the ranking in
                          ranked unit positions, the permutation back to the LM's own unit
                          order, the LM's identity, which tensors are stored transposed
    ranked.safetensors    the permuted tensors; those cut along their input columns
                          (o/down projections, GPT-2's c_attn/c_fc) are stored transposed so
                          that every cut is a run of whole rows: contiguous bytes
    generation_config.json, tokenizer/   copied to every resized sub-network

It has no ``config.json`` on purpose: it is not a Hugging Face directory and
``from_pretrained`` cannot mistake its permuted, transposed tensors for an LM.

:func:`resize` reads only the prefixes it needs with ``safe_open(...).get_slice``
(:class:`RankedTensors`, a tensor source of the one sub-network builder,
:func:`~ppn_bayes.deploy.subnetwork.build_from_source`), fills a sub-network built on the
``meta`` device, and saves it: the full LM is never materialised and peak memory is about
the sub-network's.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.architecture import FAMILIES, Architecture, architecture_from_record, describe
from ..version import VERSION as __version__
from ..io import FileFormatError, atomic_directory, atomic_write_text, read_json
from ..core.budget import Budget
from ..core.ranking import Masks, Ranking
from .subnetwork import (
    LMTensors,
    Selection,
    Take,
    Widths,
    build_from_source,
    is_parameter,
    layer_rules,
    empty_subnetwork,
    tensor_groups,
    save_subnetwork,
    selection_from_masks,
    subnetwork_config,
    tensor_plan,
)

__all__ = ["export_ranked", "resize", "RankedCheckpoint", "RankedTensors", "ResizeResult", "open_ranked", "rank_order",
           "ranked_ranking", "check_prefixes", "tokenizer_files", "RANKED_FORMAT", "RANKED_VERSION"]

RANKED_FORMAT = "ppn_bayes.ranked"
RANKED_VERSION = 1
TENSORS_FILE = "ranked.safetensors"
INDEX_FILE = "ranked.json"
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


# -- checksums: of the index, and of every block of rows a resize may read --------------------
def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()


def _index_digest(index: dict) -> str:
    body = {k: v for k, v in index.items() if k != "index_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _block_rows(take: Take, rows: int, arch: Architecture, name: str) -> int:
    """Rows per checksum block of a stored tensor: one unit's rows for a cut tensor (every
    cut is whole blocks), all rows otherwise."""
    if take.dim is None:
        return max(rows, 1)
    family = FAMILIES[arch.family]
    one = layer_rules(family, arch, [0], [0])
    suffix = name.split(".", len(family.layers.split(".")) + 1)[-1]
    numbers = [x for a, b in one[suffix][1] for x in (a, b - a) if x]
    return math.gcd(*numbers)


# -- the permutation by rank ------------------------------------------------------------------
def rank_order(ranking: Ranking) -> Selection:
    """Every layer and unit, each layer's units in the order the ranking keeps them."""
    arch = ranking.arch
    A = arch.n_attention_units
    attention: list[list[int]] = [[] for _ in range(arch.n_layers)]
    mlp: list[list[int]] = [[] for _ in range(arch.n_layers)]
    for layer, unit in ranking.items.tolist():
        if unit < 0:
            continue
        (attention if unit < A else mlp)[layer].append(unit if unit < A else unit - A)
    return Selection(layers=tuple(range(arch.n_layers)), attention=tuple(map(tuple, attention)),
                     mlp=tuple(map(tuple, mlp)))


def ranked_ranking(ranking: Ranking, order: Selection) -> Ranking:
    """The ranking with each unit renamed by its position in the ranked tensors."""
    A = ranking.arch.n_attention_units
    position = {}
    for layer in range(ranking.arch.n_layers):
        position.update({(layer, u): p for p, u in enumerate(order.attention[layer])})
        position.update({(layer, A + u): A + p for p, u in enumerate(order.mlp[layer])})
    items = [[l, u if u < 0 else position[(l, u)]] for l, u in ranking.items.tolist()]
    return Ranking(ranking.arch, torch.tensor(items, dtype=torch.long), ranking.cost.clone(), trained=ranking.trained)


def _base_ranking(ranked: Ranking, order: Selection) -> Ranking:
    """Inverse of :func:`ranked_ranking`: unit positions back to the LM's own units."""
    A = ranked.arch.n_attention_units
    items = []
    for l, p in ranked.items.tolist():
        if p < 0:
            items.append([l, p])
        elif p < A:
            items.append([l, order.attention[l][p]])
        else:
            items.append([l, A + order.mlp[l][p - A]])
    return Ranking(ranked.arch, torch.tensor(items, dtype=torch.long), ranked.cost.clone(), trained=ranked.trained)


# -- export -----------------------------------------------------------------------------------
class TokenizerFiles:
    """Stands in for a tokenizer: ``save_pretrained`` copies its files."""

    def __init__(self, files: list[Path]):
        self.files = files

    def save_pretrained(self, directory) -> None:
        """Copy the tokenizer's files into ``directory``."""
        for file in self.files:
            shutil.copy2(file, Path(directory) / file.name)


def tokenizer_files(directory: Path) -> TokenizerFiles | None:
    """The tokenizer's files in ``directory`` (everything but the model's own), or None if there are none."""
    if not directory.is_dir():
        return None
    files = [p for p in sorted(directory.iterdir())
             if p.is_file() and p.name not in _MODEL_FILES and not p.name.endswith(".safetensors")]
    return TokenizerFiles(files) if files else None


def export_ranked(source, out: str | Path, *, ranking: Ranking | None = None, tokenizer=None,
                  overwrite: bool = False) -> Path:
    """Write a ranked checkpoint of a fitted LM to ``out`` (atomically).

    Parameters
    ----------
    source:
        A :class:`~ppn_bayes.fit.PuppetFit`, the path of a fit checkpoint, or an LM (then
        ``ranking`` is required).
    out:
        The directory to write; an existing one is refused unless ``overwrite``.
    ranking:
        The ranking to sort by (default: the fit's, at the posterior median).
    tokenizer:
        Saved under ``tokenizer/`` (default: the fit checkpoint's tokenizer files, if any).
    """
    from .identity import model_identity

    from ..core.adapters import refuse_adapters

    if isinstance(source, (str, Path)):
        from ..train import load_fit, recorded_size_rank

        checkpoint = Path(source)
        refuse_adapters(recorded_size_rank(checkpoint), checkpoint, "a ranked checkpoint")
        fitted = load_fit(checkpoint)
        if tokenizer is None:
            tokenizer = tokenizer_files(checkpoint / "lm")
        source_name = str(checkpoint)
        source = fitted
    else:
        source_name = type(source).__name__
    if isinstance(source, nn.Module):
        lm = source
        if ranking is None:
            raise ValueError("pass the ranking to sort an LM by (ranking=)")
    else:  # a PuppetFit
        refuse_adapters(source.config.size_rank, "this fit", "a ranked checkpoint")
        lm = source.lm
        ranking = ranking if ranking is not None else source.ranking()
    arch = describe(lm, mlp_group=ranking.arch.mlp_group)
    if arch.to_dict() != ranking.arch.to_dict():
        raise ValueError("the ranking was made for another model (the LM's architecture differs)")
    order = rank_order(ranking)
    source = LMTensors(lm)
    groups = tensor_groups(lm)
    plan = tensor_plan(arch, order, [group[0] for group in groups])
    stored, transposed, aliases, checksums = {}, [], {}, {}
    for group in groups:
        name = group[0]
        take = plan[name]
        tensor = source.take(take).cpu()
        if take.dim == 1 and tensor.dim() == 2:
            # Cut along columns later: store [in, out] so a cut is a run of whole rows.
            tensor = tensor.t().contiguous()
            transposed.append(name)
        stored[name] = tensor
        aliases.update({alias: name for alias in group[1:]})
        rows = tensor.shape[0] if tensor.dim() else 1
        block = _block_rows(take, rows, arch, name)
        blocks = [tensor[a:a + block] if tensor.dim() else tensor for a in range(0, rows, block)]
        checksums[name] = {"block": block, "blake2b": [_digest(b) for b in blocks]}
    index = {
        "format": RANKED_FORMAT,
        "format_version": RANKED_VERSION,
        "config": lm.config.to_dict(),
        "architecture": arch.to_dict(),
        "ranking": ranked_ranking(ranking, order).to_dict(),
        "permutation": {"attention": [list(a) for a in order.attention], "mlp": [list(m) for m in order.mlp]},
        "transposed": transposed,
        "aliases": aliases,
        "base_model": model_identity(lm),
        "source": source_name,
        "ppn_bayes": __version__,
        "checksums": checksums,
    }
    index["index_sha256"] = _index_digest(index)
    from safetensors.torch import save_file

    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(stored, str(tmp / TENSORS_FILE), metadata={"format": RANKED_FORMAT})
        del stored
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            (tmp / "tokenizer").mkdir()
            tokenizer.save_pretrained(tmp / "tokenizer")
        atomic_write_text(tmp / INDEX_FILE, json.dumps(index, indent=1))
    return Path(out)


# -- reading a ranked checkpoint --------------------------------------------------------------
@dataclass
class RankedCheckpoint:
    """A validated ranked checkpoint (nothing but its JSON and tensor header read)."""

    path: Path
    config: object
    arch: Architecture
    ranking: Ranking  # in ranked unit positions: every size keeps a prefix of each layer
    order: Selection  # position -> the fitted LM's own unit
    transposed: frozenset
    aliases: dict
    base_model: dict
    shapes: dict  # stored tensor name -> shape
    checksums: dict  # stored tensor name -> {"block": rows, "blake2b": [digest of each block]}

    @property
    def tensors_file(self) -> Path:
        """The safetensors file holding the ranked tensors."""
        return self.path / TENSORS_FILE

    def base_ranking(self) -> Ranking:
        """The ranking in the fitted LM's own unit order (what a mask file stores)."""
        return _base_ranking(self.ranking, self.order)

    def masks(self, size: float | None = None, *, n_params: int | None = None) -> Masks:
        """Masks in ranked positions for ``size`` or ``n_params`` (exactly one)."""
        return self.ranking.masks_for(Budget(size, n_params))


def _check_order(order, arch: Architecture) -> Selection:
    if not isinstance(order, dict) or set(order) != {"attention", "mlp"}:
        raise ValueError("'permutation' must hold 'attention' and 'mlp'")
    rows = []
    for key, count in (("attention", arch.n_attention_units), ("mlp", arch.n_mlp_units)):
        value = order[key]
        if not isinstance(value, list) or len(value) != arch.n_layers or not all(
                isinstance(row, list) and sorted(row) == list(range(count))
                and all(isinstance(x, int) and not isinstance(x, bool) for x in row) for row in value):
            raise ValueError(f"permutation.{key} must hold, per layer, a permutation of 0..{count - 1}")
        rows.append(tuple(map(tuple, value)))
    return Selection(layers=tuple(range(arch.n_layers)), attention=rows[0], mlp=rows[1])


def check_prefixes(ranking: Ranking) -> None:
    """Every layer's units appear in the ranking in position order (prefix property)."""
    A = ranking.arch.n_attention_units
    seen_attention = [0] * ranking.arch.n_layers
    seen_mlp = [0] * ranking.arch.n_layers
    for l, p in ranking.items.tolist():
        if p < 0:
            continue
        seen, start = (seen_attention, 0) if p < A else (seen_mlp, A)
        if p - start != seen[l]:
            raise ValueError(f"layer {l}'s units are not stored in rank order (unit {p} comes too early)")
        seen[l] += 1


def open_ranked(path: str | Path) -> RankedCheckpoint:
    """Read and check a ranked checkpoint's index and tensor header.

    Raises :class:`~ppn_bayes.io.FileFormatError` for anything that is not a ranked
    checkpoint of this version, is inconsistent (ranking, permutation, architecture against
    the config), or misses a tensor or holds one of the wrong shape.
    """
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig


    path = Path(path)
    if not path.is_dir():
        raise FileFormatError(f"{path} is not a directory (a ranked checkpoint is one)")
    data = read_json(path / INDEX_FILE, "ranked checkpoint")
    if data.get("format") != RANKED_FORMAT:
        raise FileFormatError(f"{path} is not a ppn_bayes ranked checkpoint (format {data.get('format')!r})")
    if data.get("format_version") != RANKED_VERSION:
        raise FileFormatError(f"{path} is ranked checkpoint version {data.get('format_version')!r}; this ppn_bayes "
                              f"({__version__}) reads version {RANKED_VERSION}")
    if data.get("index_sha256") != _index_digest(data):
        raise FileFormatError(f"ranked checkpoint {path}: {INDEX_FILE} was edited or is corrupt (its checksum "
                              "does not match); export the checkpoint again")
    try:
        arch = architecture_from_record(data.get("architecture"))
        ranking = Ranking.from_dict(arch, data.get("ranking"))
        check_prefixes(ranking)
        order = _check_order(data.get("permutation"), arch)
        config_dict = data.get("config")
        if not isinstance(config_dict, dict) or config_dict.get("model_type") != arch.model_type:
            raise ValueError("'config' must be the LM's config, of the architecture's model_type")
        config = AutoConfig.for_model(**config_dict)
        transposed, aliases = data.get("transposed"), data.get("aliases")
        if not isinstance(transposed, list) or not all(isinstance(n, str) for n in transposed):
            raise ValueError("'transposed' must list tensor names")
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise ValueError("'aliases' must map tensor names to tensor names")
        if not isinstance(data.get("base_model"), dict):
            raise ValueError("'base_model' must hold the LM's identity")
        checksums = data.get("checksums")
        if not isinstance(checksums, dict) or not all(
                isinstance(c, dict) and isinstance(c.get("block"), int) and c["block"] > 0
                and isinstance(c.get("blake2b"), list) for c in checksums.values()):
            raise ValueError("'checksums' must give a block size and digests per tensor")
        # The architecture must be what the config builds (checked on the meta device).
        family = FAMILIES[arch.family]
        full = _full_widths(arch)
        skeleton = empty_subnetwork(subnetwork_config(config, family, full), family, full)
        if describe(skeleton, mlp_group=arch.mlp_group).to_dict() != arch.to_dict():
            raise ValueError("the architecture does not match the config")
    except FileFormatError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, RuntimeError, AttributeError) as err:
        raise FileFormatError(f"ranked checkpoint {path}: {err}") from None
    file = path / TENSORS_FILE
    if not file.is_file():
        raise FileFormatError(f"ranked checkpoint {path}: {TENSORS_FILE} is missing")
    try:
        with safe_open(str(file), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise FileFormatError(f"ranked checkpoint {path}: {TENSORS_FILE} is corrupt ({err})") from None
    checkpoint = RankedCheckpoint(path=path, config=config, arch=arch, ranking=ranking, order=order,
                                  transposed=frozenset(transposed), aliases=dict(aliases),
                                  base_model=data["base_model"], shapes=shapes, checksums=checksums)
    for group in tensor_groups(skeleton):
        name = checkpoint.aliases.get(group[0], group[0])
        if name not in shapes:
            raise FileFormatError(f"ranked checkpoint {path}: {TENSORS_FILE} lacks tensor {name}")
        tensor = skeleton.get_parameter(group[0]) if is_parameter(skeleton, group[0]) else skeleton.get_buffer(group[0])
        want = tuple(tensor.shape)
        if name in checkpoint.transposed:
            want = want[::-1]
        if shapes[name] != want:
            raise FileFormatError(f"ranked checkpoint {path}: {name} has shape {shapes[name]}, expected {want}")
        rows = want[0] if want else 1
        check = checksums.get(name)
        if check is None or len(check["blake2b"]) != -(-rows // check["block"]):
            raise FileFormatError(f"ranked checkpoint {path}: no checksums for every block of {name}")
    return checkpoint


def _full_widths(arch: Architecture) -> Widths:
    return Widths(source_layers=tuple(range(arch.n_layers)), attention_units=(arch.n_attention_units,) * arch.n_layers,
                  mlp_units=(arch.n_mlp_units,) * arch.n_layers, heads_per_unit=arch.heads_per_unit,
                  head_dim=arch.head_dim, mlp_group=arch.mlp_group, base_layers=arch.n_layers)


# -- resize -----------------------------------------------------------------------------------
class RankedTensors:
    """A ranked checkpoint as a :class:`~ppn_bayes.deploy.subnetwork.TensorSource`: reads
    the cuts asked for (:class:`~ppn_bayes.deploy.subnetwork.Take`) from the open tensor
    file ``handle`` slice by slice, checks each against its checksums, converts it to
    ``dtype`` (None: as stored) on ``device``, and counts the bytes it reads. Names are
    those of the rank-sorted LM the checkpoint stores."""

    shares_storage = False
    attn_implementation = None
    reference = None

    def __init__(self, handle, checkpoint: RankedCheckpoint, dtype, device):
        self.handle = handle
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.dtype = dtype
        self.device = device
        self.bytes_read = 0

    def generation_config(self):
        """The checkpoint's generation config, or None if it has none."""
        if not (self.checkpoint.path / "generation_config.json").is_file():
            return None
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(str(self.checkpoint.path))

    def _verify(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Check the blocks of rows ``start ..`` just read against the stored digests."""
        check = self.checkpoint.checksums[name]
        block = check["block"]
        count = rows.shape[0] if rows.dim() else 1
        if start % block or (count % block and start + count != (self.checkpoint.shapes[name] or (1,))[0]):
            raise FileFormatError(f"{name}: a cut of rows {start}..{start + count} is not whole checksum blocks")
        for offset in range(0, count, block):
            piece = rows[offset:offset + block] if rows.dim() else rows
            if _digest(piece) != check["blake2b"][(start + offset) // block]:
                raise FileFormatError(
                    f"ranked checkpoint {self.checkpoint.path}: {name} rows {start + offset}.. fail their "
                    "checksum (the tensor file is corrupt); export the checkpoint again")

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds a tensor ``name``."""
        return self.checkpoint.aliases.get(name, name) in self.checkpoint.shapes

    def take(self, take: Take) -> torch.Tensor:
        """The rows ``take`` keeps, read from the file."""
        name = self.checkpoint.aliases.get(take.source, take.source)
        if name not in self.checkpoint.shapes:
            raise FileFormatError(f"ranked checkpoint {self.checkpoint.path}: lacks tensor {name}")
        piece = self.handle.get_slice(name)
        transposed = name in self.checkpoint.transposed
        if take.dim is None:
            tensor = piece[:]
            self._verify(name, 0, tensor)
        else:
            dim = 0 if transposed else take.dim  # stored transposed: the cut is along rows
            if dim != 0:
                raise FileFormatError(f"ranked checkpoint {self.checkpoint.path}: {name} is cut along columns; "
                                      "it should be stored transposed")
            ranges = take.ranges or ((0, 0),)  # no unit kept: an empty cut of the right dtype
            parts = [piece[a:b] for a, b in ranges]
            for (a, _), part in zip(ranges, parts):
                self._verify(name, a, part)
            tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.bytes_read += tensor.numel() * tensor.element_size()
        if transposed:
            tensor = tensor.t()
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor.contiguous().to(self.device)


def _open_for_reading(file: Path):
    """``safe_open`` reading with ``pread`` where safetensors offers it: the bytes read are
    copied into the tensors and no page of the file stays mapped into the process (with
    the default memory map, every page read would count as resident memory as well)."""
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", backend="pread")
    except TypeError:  # safetensors without the backend option: memory-mapped
        return safe_open(str(file), framework="pt")


@dataclass
class ResizeResult:
    """What :func:`resize` did: sizes, parameters, bytes read, time; ``lm`` is the sub-network."""

    size_requested: float
    size_reached: float
    kept_params: int
    total_params: int
    bytes_read: int
    checkpoint_bytes: int
    seconds: float
    out: str | None
    lm: nn.Module | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """The figures, without the module."""
        return {k: v for k, v in self.__dict__.items() if k != "lm"}


def resize(ranked: str | Path | RankedCheckpoint, size: float | None = None, out: str | Path | None = None, *,
           n_params: int | None = None, overwrite: bool = False, dtype: torch.dtype | None = None,
           device: str | torch.device = "cpu") -> ResizeResult:
    """Cut a sub-network of ``size`` (or ``n_params``) from a ranked checkpoint.

    Reads only the rows each kept tensor needs (``safe_open(...).get_slice``), never the
    full LM; builds the sub-network on the meta device and fills it; saves it to ``out``
    (atomically, refusing an existing directory unless ``overwrite``) when given. The
    result carries the module (``.lm``) and the bytes read from the tensor file.

    Raises ``ValueError`` for a size outside (0, 1] or below the smallest sub-network, and
    :class:`~ppn_bayes.io.FileFormatError` for a damaged checkpoint.
    """
    from safetensors import SafetensorError

    began = time.perf_counter()
    checkpoint = ranked if isinstance(ranked, RankedCheckpoint) else open_ranked(ranked)
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    masks = checkpoint.masks(size, n_params=n_params)
    selection = selection_from_masks(masks)
    file = checkpoint.tensors_file
    with file.open("rb") as head:
        header = 8 + int.from_bytes(head.read(8), "little")
    try:
        with _open_for_reading(file) as handle:
            reader = RankedTensors(handle, checkpoint, dtype, device)
            sub = build_from_source(reader, checkpoint.arch, selection)
    except SafetensorError as err:
        raise FileFormatError(f"ranked checkpoint {checkpoint.path}: {TENSORS_FILE} is corrupt ({err})") from None
    if out is not None:
        save_subnetwork(sub, tokenizer_files(checkpoint.path / "tokenizer"), out, overwrite=overwrite)
    return ResizeResult(
        size_requested=masks.size_requested,
        size_reached=masks.size_reached,
        kept_params=masks.kept_params,
        total_params=masks.total_params,
        bytes_read=reader.bytes_read + header,
        checkpoint_bytes=file.stat().st_size,
        seconds=time.perf_counter() - began,
        out=str(out) if out is not None else None,
        lm=sub,
    )
