"""The mask file: hard masks for deployment, versioned and validated when read.

One JSON file (small: a ranking has ``L·(1+U)`` items) holding

* ``format`` and ``format_version``;
* ``base_model``: the identity of the LM the masks apply to: its ``model_type``, a hash of
  its tensor names and shapes and of its config's shape fields, and a fingerprint of its
  weights (a few values of every tensor);
* ``architecture``: the unit definitions and costs (:class:`~ppn_bayes.core.architecture.Architecture`),
  with ``units`` spelling out what one attention unit and one MLP unit own;
* ``ranking``: the deterministic ranking (items and costs);
* ``masks``: one entry per requested size: its budget in parameters, the requested size,
  the parameters kept and the layer and unit masks.

:func:`load_masks` refuses, with a :class:`~ppn_bayes.io.FileFormatError` naming the
problem, a file that is not JSON or is truncated, of an unknown version, for another model
(when the LM is passed), or hand-edited into something inconsistent: a ranking that misses
an item or puts a unit before its layer, costs that differ from the architecture, a mask
that keeps a unit of a dropped layer, is over its budget, is not nested in the larger
masks, or is not the longest prefix of the ranking within its budget. A mask that loads is
therefore always the one the ranking gives.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ..core.architecture import FAMILIES, Architecture, architecture_from_record, describe
from .identity import model_identity
from ..version import VERSION as __version__
from ..io import FileFormatError, atomic_write_text, read_json
from ..core.budget import Budget
from ..core.ranking import Masks, Ranking

__all__ = ["MaskFile", "save_masks", "load_masks", "model_identity", "MASKS_FORMAT", "MASKS_VERSION"]

MASKS_FORMAT = "ppn_bayes.masks"
MASKS_VERSION = 1


def _unit_definitions(arch: Architecture) -> dict:
    family = FAMILIES[arch.family]
    q_rows = arch.heads_per_unit * arch.head_dim
    return {
        "axis": "per layer: attention units 0..A-1, then MLP units A..A+M-1",
        "attention": {
            "count": arch.n_attention_units,
            "owns": f"one key/value group: {arch.heads_per_unit} query head(s) of {arch.head_dim} channels "
                    f"({q_rows} rows of {family.q}, {arch.head_dim} of {family.k} and {family.v}, "
                    f"{q_rows} input columns of {family.o})",
        },
        "mlp": {
            "count": arch.n_mlp_units,
            "channels": arch.mlp_group,
            "owns": f"{arch.mlp_group} consecutive intermediate channels ({', '.join(family.mlp_in)} rows, "
                    f"{family.mlp_out} input columns)",
        },
        "layer": "a whole decoder block; owns its norms and every parameter no unit owns",
    }


# -- the file ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskFile:
    """A loaded mask file: architecture, ranking, the stored masks and the base model's identity."""

    arch: Architecture
    ranking: Ranking
    masks: tuple[Masks, ...]
    base_model: dict

    def masks_for(self, size: float | None = None, *, n_params: int | None = None) -> Masks:
        """Masks for ``size`` (a fraction) or ``n_params``: from the ranking, which gives the
        stored masks for the stored sizes and any other size as well."""
        return self.ranking.masks_for(Budget(size, n_params))


def _mask_entry(masks: Masks, budget: int) -> dict:
    return {
        "size_requested": masks.size_requested,
        "budget": budget,
        "kept_params": masks.kept_params,
        "size_reached": masks.size_reached,
        "layer": masks.layer.int().tolist(),
        "unit": masks.unit.int().tolist(),
    }


def save_masks(path: str | Path, ranking: Ranking, *, sizes: Iterable[float] = (), n_params: Iterable[int] = (),
               lm: nn.Module | None = None, identity: Mapping | None = None, overwrite: bool = False,
               source: str | None = None) -> Path:
    """Write a mask file for ``ranking`` at the requested ``sizes`` and parameter counts.

    Parameters
    ----------
    path:
        The JSON file to write (atomically); an existing file is refused unless
        ``overwrite``.
    ranking:
        The ranking, in the unit order of the LM the masks apply to.
    sizes, n_params:
        Fractions of the decoder's parameters, and parameter budgets; each gives one mask.
    lm, identity:
        The LM the masks apply to, or its :func:`model_identity` (one is required).
    source:
        Where the ranking came from (recorded, e.g. a checkpoint path).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if (lm is None) == (identity is None):
        raise ValueError("pass the LM the masks are for (lm=) or its identity (identity=), not both")
    if lm is not None:
        arch = describe(lm, mlp_group=ranking.arch.mlp_group)
        if arch.to_dict() != ranking.arch.to_dict():
            raise ValueError("the ranking was made for another model (the LM's architecture differs)")
        identity = model_identity(lm)
    entries = []
    for budget in [Budget(size=size) for size in sizes] + [Budget(n_params=count) for count in n_params]:
        entries.append(_mask_entry(ranking.masks_for(budget), budget.params(ranking.total_params)))
    entries.sort(key=lambda e: e["budget"])
    data = {
        "format": MASKS_FORMAT,
        "format_version": MASKS_VERSION,
        "base_model": dict(identity),
        "architecture": ranking.arch.to_dict(),
        "units": _unit_definitions(ranking.arch),
        "ranking": ranking.to_dict(),
        "masks": entries,
        "created": {"ppn_bayes": __version__, "source": source,
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }
    atomic_write_text(path, json.dumps(data, indent=1))
    return path


# -- reading, with every check ----------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bool_grid(value, shape: tuple[int, ...], what: str) -> torch.Tensor:
    def ok(v, dims):
        if not dims:
            return v in (0, 1) and _is_int(v)
        return isinstance(v, list) and len(v) == dims[0] and all(ok(x, dims[1:]) for x in v)

    if not ok(value, shape):
        raise ValueError(f"{what} must be a {' x '.join(map(str, shape))} grid of 0/1")
    return torch.tensor(value, dtype=torch.bool).reshape(shape)


def _check_masks(arch: Architecture, ranking: Ranking, entries) -> tuple[Masks, ...]:
    if not isinstance(entries, list):
        raise ValueError("'masks' must be a list")
    layer_cost, unit_cost = arch.costs(dtype=torch.int64)
    total = arch.total_cost
    loaded = []
    for index, entry in enumerate(entries):
        what = f"masks[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{what} must be an object")
        budget = entry.get("budget")
        if not _is_int(budget) or not 0 < budget <= total:
            raise ValueError(f"{what}.budget must be an integer in (0, {total}], got {budget!r}")
        size = entry.get("size_requested")
        if size is not None:
            if not isinstance(size, (int, float)) or isinstance(size, bool) or not 0 < size <= 1:
                raise ValueError(f"{what}.size_requested must be a fraction in (0, 1], got {size!r}")
            if int(float(size) * total) != budget and not (size == budget / total):
                raise ValueError(f"{what}: size_requested {size} does not give its budget {budget}")
        layer = _bool_grid(entry.get("layer"), (arch.n_layers,), f"{what}.layer")
        unit = _bool_grid(entry.get("unit"), (arch.n_layers, arch.n_units), f"{what}.unit")
        orphans = (unit & ~layer[:, None]).nonzero().tolist()
        if orphans:
            l, u = orphans[0]
            raise ValueError(f"{what} keeps unit {u} of dropped layer {l} (inconsistent hierarchy)")
        kept = int(layer_cost[layer].sum() + unit_cost[unit].sum())
        if kept > budget:
            raise ValueError(f"{what} keeps {kept} parameters, over its budget of {budget}")
        if entry.get("kept_params") != kept:
            raise ValueError(f"{what}.kept_params is {entry.get('kept_params')!r}, its masks keep {kept}")
        expected = ranking.masks_for_params(budget, size_requested=size)
        stored = Masks(arch, layer, unit, expected.size_requested, kept, total)
        for previous in loaded:
            small, large = (previous, stored) if previous.kept_params <= kept else (stored, previous)
            if not small <= large:
                raise ValueError(f"{what} is not nested with the other masks of the file")
        if not (torch.equal(layer, expected.layer) and torch.equal(unit, expected.unit)):
            raise ValueError(f"{what} is not the longest prefix of the ranking within its budget of {budget}")
        reached = entry.get("size_reached")
        if not isinstance(reached, (int, float)) or abs(reached - kept / total) > 1e-9:
            raise ValueError(f"{what}.size_reached is {reached!r}, its masks reach {kept / total}")
        loaded.append(expected)
    return tuple(loaded)


def _check_identity(identity: dict, lm: nn.Module, arch: Architecture, path: Path) -> None:
    actual_arch = describe(lm, mlp_group=arch.mlp_group)
    if actual_arch.to_dict() != arch.to_dict():
        different = sorted(k for k, v in actual_arch.to_dict().items() if arch.to_dict().get(k) != v)
        raise FileFormatError(f"{path} is a mask file for another model (the architectures differ in {different})")
    actual = model_identity(lm)
    if identity.get("shapes_sha256") != actual["shapes_sha256"]:
        raise FileFormatError(f"{path} is a mask file for another model (tensor names or shapes differ)")
    if identity.get("weights_sha256") != actual["weights_sha256"]:
        warnings.warn(f"{path} was made for an LM with other weights (for example the base model before the "
                      "fit, or the fitted one): the structure fits, the quality may not", stacklevel=3)


def load_masks(path: str | Path, lm: nn.Module | None = None) -> MaskFile:
    """Read and check a mask file written by :func:`save_masks`.

    With ``lm``, a file made for another model is refused (architecture, tensor names and
    shapes); a file made for the same shapes but other weights (the base model rather
    than the fitted one) only warns. Every other check is described in the module's
    docstring. Raises :class:`~ppn_bayes.io.FileFormatError` (a ``ValueError``) with the
    reason.
    """
    path = Path(path)
    data = read_json(path, "mask file")
    if data.get("format") != MASKS_FORMAT:
        raise FileFormatError(f"{path} is not a ppn_bayes mask file (format {data.get('format')!r})")
    if data.get("format_version") != MASKS_VERSION:
        raise FileFormatError(f"{path} is mask file version {data.get('format_version')!r}; this ppn_bayes "
                              f"({__version__}) reads version {MASKS_VERSION}")
    try:
        identity = data.get("base_model")
        if not isinstance(identity, dict) or not isinstance(identity.get("shapes_sha256"), str):
            raise ValueError("'base_model' must hold the model's identity (shapes_sha256)")
        arch = architecture_from_record(data.get("architecture"))
        if data.get("units") != _unit_definitions(arch):
            raise ValueError("'units' do not match the architecture's unit definitions")
        ranking = Ranking.from_dict(arch, data.get("ranking"))
        masks = _check_masks(arch, ranking, data.get("masks"))
    except FileFormatError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, RuntimeError) as err:
        raise FileFormatError(f"{path}: {err}") from None
    if identity.get("model_type") != arch.model_type:
        raise FileFormatError(f"{path}: base_model.model_type differs from the architecture's")
    if lm is not None:
        _check_identity(identity, lm, arch, path)
    return MaskFile(arch=arch, ranking=ranking, masks=masks, base_model=identity)
