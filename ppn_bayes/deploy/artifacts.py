"""Where a path becomes an object: what kind of file or folder it is, and opening it.

:func:`checkpoint_kind` tells a ranked checkpoint, a fit checkpoint, a sub-network, a
Hugging Face directory and a GGUF file apart, and :func:`open_tokenizer` knows where each
kind keeps its tokenizer. :func:`open_model` opens any of them (cut to a size when asked);
:func:`open_ranked_lm` opens the full LM with the ranking its cuts come from (the targets of
speculative decoding); :func:`resize_checkpoint` resizes a fit or ranked checkpoint and
:func:`export_masks` writes the mask file of either. The commands go through these; the
modules below them take objects (the format readers, ``open_ranked``, ``load_fit``,
``load_subnetwork``, ``load_lm``, ``load_masks``, each read one kind of file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..io import FileFormatError
from .maskfile import MaskFile, load_masks, save_masks
from ..core.budget import Budget
from ..core.ranking import Masks
from ..train.checkpoint import recorded_size_rank
from .resize import INDEX_FILE, ResizeResult, export_ranked, open_ranked, resize, tokenizer_files

__all__ = ["checkpoint_kind", "open_tokenizer", "resize_checkpoint", "OpenedModel", "open_model", "RankedLM",
           "open_ranked_lm", "export_masks"]

#: Where the kinds whose tokenizer is optional keep it, under the checkpoint's folder.
_OPTIONAL_TOKENIZER = {"ranked": "tokenizer", "fit": "lm"}


def checkpoint_kind(path: str | Path) -> str:
    """``'ranked'``, ``'fit'`` (a fit checkpoint), ``'subnetwork'``, ``'hf'`` (a Hugging
    Face directory) or ``'gguf'``; ``FileNotFoundError`` for anything else."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir():
        if (path / INDEX_FILE).is_file():
            return "ranked"
        if (path / "state.json").is_file():
            return "fit"
        if (path / "config.json").is_file():
            try:
                config = json.loads((path / "config.json").read_text())
            except ValueError:
                raise FileFormatError(f"{path}/config.json is not valid JSON") from None
            return "subnetwork" if isinstance(config, dict) and "ppn_widths" in config else "hf"
    raise FileNotFoundError(
        f"{path} is none of: a ranked checkpoint (ranked.json), a fit checkpoint (state.json), a Hugging Face "
        "or sub-network directory (config.json), a .gguf file"
    )


def open_tokenizer(path: str | Path, kind: str | None = None):
    """The tokenizer a checkpoint carries, from where its kind (:func:`checkpoint_kind`)
    keeps it: a ranked checkpoint's ``tokenizer/`` or a fit checkpoint's ``lm/`` (``None``
    when they hold none), a sub-network's or Hugging Face directory's own folder (required).
    A GGUF file's tokenizer is read with its LM (:func:`~ppn_bayes.lm.load_lm`)."""
    from ..lm import load_tokenizer

    path = Path(path)
    kind = checkpoint_kind(path) if kind is None else kind
    if kind in _OPTIONAL_TOKENIZER:
        folder = path / _OPTIONAL_TOKENIZER[kind]
        return load_tokenizer(folder) if tokenizer_files(folder) is not None else None
    if kind in ("subnetwork", "hf"):
        return load_tokenizer(path)
    raise ValueError(f"{path} is a {kind} file: its tokenizer is read with its LM (load_lm)")


def _open_full(path: Path, kind: str, *, device, dtype, ranking: bool) -> tuple[nn.Module, object, object]:
    """``(lm, tokenizer, ranking or None)`` of a fit checkpoint, a Hugging Face directory or
    a GGUF file: the full LM, and with ``ranking`` a fit's ranking at its posterior median.
    A fit with size adapters is refused here: its LM differs by size (:func:`open_model` cuts it)."""
    if kind == "fit":
        from ..core.adapters import refuse_adapters
        from ..train import load_fit

        refuse_adapters(recorded_size_rank(path), path, "one full LM for every size (a mask file, ranked drafts)")
        fitted = load_fit(path, device=device, dtype=dtype)
        return fitted.lm, open_tokenizer(path, kind), fitted.ranking() if ranking else None
    from ..lm import load_lm

    lm, tokenizer = load_lm(path, dtype=dtype, device=device)
    return lm, tokenizer, None


def resize_checkpoint(checkpoint: str | Path, out: str | Path, *, size: float | None = None,
                      n_params: int | None = None, overwrite: bool = False, keep_ranked: str | Path | None = None,
                      dtype: torch.dtype | None = None) -> ResizeResult:
    """:func:`resize` a ranked checkpoint, or a fit checkpoint through a ranked one.

    A fit checkpoint is first exported with :func:`export_ranked` (which loads the full
    LM) to ``keep_ranked``, or to a temporary directory removed afterwards; export once
    and resize the ranked checkpoint to avoid loading the full LM at every size. A fit with
    size adapters (``size_rank > 0``) has weights of each size's own, which no ranked
    checkpoint holds: it is loaded whole and cut at once (:meth:`PuppetFit.subnetwork
    <ppn_bayes.train.state.PuppetFit.subnetwork>`), and ``keep_ranked`` is refused.
    """
    kind = checkpoint_kind(checkpoint)
    if kind == "ranked":
        return resize(checkpoint, size, out, n_params=n_params, overwrite=overwrite, dtype=dtype)
    if kind != "fit":
        raise ValueError(f"{checkpoint} is a {kind} model, not a fit or ranked checkpoint: nothing to resize")
    from ..core.adapters import refuse_adapters

    size_rank = recorded_size_rank(Path(checkpoint))
    if keep_ranked is not None:
        refuse_adapters(size_rank, checkpoint, "a ranked checkpoint (--keep-ranked)")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if size_rank:
        return _resize_adapted(Path(checkpoint), out, size=size, n_params=n_params, overwrite=overwrite, dtype=dtype)
    if keep_ranked is not None:
        ranked = export_ranked(checkpoint, keep_ranked, overwrite=overwrite)
        return resize(ranked, size, out, n_params=n_params, overwrite=overwrite, dtype=dtype)
    import tempfile

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ranked.", dir=Path(out).parent) as tmp:
        ranked = export_ranked(checkpoint, Path(tmp) / "ranked")
        return resize(ranked, size, out, n_params=n_params, overwrite=overwrite, dtype=dtype)


def _resize_adapted(checkpoint: Path, out: str | Path, *, size: float | None, n_params: int | None,
                    overwrite: bool, dtype: torch.dtype | None) -> ResizeResult:
    """The sub-network of ``size`` of a fit with size adapters, saved to ``out``: the fit loaded
    whole (its LM, guide and adapters), the correction of the size merged, then cut."""
    import time

    from ..train import load_fit
    from .subnetwork import save_subnetwork

    began = time.perf_counter()
    Budget(size, n_params)  # a bad size or count is refused before the LM loads
    fitted = load_fit(checkpoint)
    sub, masks = fitted.subnetwork(size, n_params=n_params)
    if dtype is not None:
        sub.to(dtype)
    save_subnetwork(sub, open_tokenizer(checkpoint, "fit"), out, overwrite=overwrite)
    files = [checkpoint / "lm" / "model.safetensors", checkpoint / "guide.safetensors",
             checkpoint / "adapters.safetensors"]
    read = sum(f.stat().st_size for f in files)
    return ResizeResult(size_requested=masks.size_requested, size_reached=masks.size_reached,
                        kept_params=masks.kept_params, total_params=masks.total_params, bytes_read=read,
                        checkpoint_bytes=read, seconds=time.perf_counter() - began, out=str(out), lm=sub)


@dataclass
class OpenedModel:
    """An LM opened for evaluation, with what it is and, if cut, the masks that cut it."""

    lm: nn.Module
    tokenizer: object
    kind: str
    masks: Masks | None = None
    masked_dense: bool = False  # evaluate ``lm`` under ``masks`` instead of a sliced sub-network


def open_model(path: str | Path, *, size: float | None = None, n_params: int | None = None,
               masks_file: str | Path | None = None, masked_dense: bool = False,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> OpenedModel:
    """Open any model ppn_bayes writes or reads, cut to ``size`` when asked.

    * a ``.gguf`` file or Hugging Face directory: as it is, or cut by ``masks_file`` at
      ``size``;
    * a sub-network directory: as it is (:func:`~ppn_bayes.deploy.subnetwork.load_subnetwork`);
    * a fit checkpoint: the fitted LM, cut at ``size`` by its ranking (or ``masks_file``);
    * a ranked checkpoint: resized to ``size`` without loading the full LM.

    A cut model is a sliced sub-network, or with ``masked_dense`` the full LM under the
    masks (the slow reference).
    """
    from .subnetwork import build_subnetwork, load_subnetwork

    path = Path(path)
    kind = checkpoint_kind(path)
    wants_cut = size is not None or n_params is not None
    if masks_file is not None and not wants_cut:
        raise ValueError("a mask file needs --size or --params to choose the mask")
    if kind == "ranked":
        if not wants_cut or masks_file is not None or masked_dense:
            raise ValueError(f"{path} is a ranked checkpoint: give --size or --params (and no mask file)")
        checkpoint = open_ranked(path)
        result = resize(checkpoint, size, n_params=n_params, dtype=dtype, device=device)
        return OpenedModel(result.lm, open_tokenizer(path, kind), kind, checkpoint.masks(size, n_params=n_params))
    if kind == "subnetwork":
        if wants_cut:
            raise ValueError(f"{path} is already a sub-network: it cannot be cut again")
        lm = load_subnetwork(path, device=device, dtype=dtype)
        return OpenedModel(lm, open_tokenizer(path, kind), kind)
    if kind != "fit" and wants_cut and masks_file is None:
        raise ValueError(f"{path} holds no ranking: pass a mask file to cut it")
    if kind == "fit" and masks_file is None and recorded_size_rank(path):
        return _open_adapter_fit(path, size, n_params, masked_dense, device=device, dtype=dtype)
    lm, tokenizer, ranking = _open_full(path, kind, device=device, dtype=dtype, ranking=masks_file is None)
    if not wants_cut:
        return OpenedModel(lm, tokenizer, kind)
    if masks_file is not None:
        masks = load_masks(masks_file, lm).masks_for(size, n_params=n_params)
    else:
        masks = ranking.masks_for(Budget(size, n_params))
    if masked_dense:
        return OpenedModel(lm, tokenizer, kind, masks, masked_dense=True)
    sub = build_subnetwork(lm, masks)
    del lm
    return OpenedModel(sub, tokenizer, kind, masks)


def _open_adapter_fit(path: Path, size, n_params, masked_dense: bool, *, device, dtype) -> OpenedModel:
    """A fit with size adapters, opened as it ships: cut at ``size`` (or ``n_params``), the
    sub-network of its own ranking sliced from the LM with that size's correction merged
    (:meth:`~ppn_bayes.train.state.PuppetFit.lm_at`); uncut, the full LM at size 1."""
    from ..train import load_fit
    from .subnetwork import build_subnetwork

    fitted = load_fit(path, device=device, dtype=dtype)
    tokenizer = open_tokenizer(path, "fit")
    if size is None and n_params is None:
        return OpenedModel(fitted.adapters.merge_(fitted.lm, 1.0), tokenizer, "fit")
    masks = fitted.ranking().masks_for(Budget(size, n_params))
    lm = fitted.adapters.merge_(fitted.lm, masks.size_requested)  # the loaded LM is ours: merged in place
    if masked_dense:
        return OpenedModel(lm, tokenizer, "fit", masks, masked_dense=True)
    sub = build_subnetwork(lm, masks)
    del lm, fitted
    return OpenedModel(sub, tokenizer, "fit", masks)


@dataclass
class RankedLM:
    """A full LM with the ranking its cuts come from, and its tokenizer (if any).

    ``ranked`` says the LM's units are stored in rank order (opened from a ranked
    checkpoint), so that every cut is a prefix of its tensors.
    """

    lm: nn.Module
    ranking: object
    tokenizer: object
    kind: str
    ranked: bool


def open_ranked_lm(path: str | Path, *, masks_file: str | Path | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> RankedLM:
    """Open a full LM and the ranking its cuts come from.

    ``path`` is a ranked checkpoint (the full LM read in rank order, no pyro needed), a
    fit checkpoint (the fitted LM and its ranking, or ``masks_file``'s), or a Hugging Face
    directory or ``.gguf`` file with ``masks_file`` (a mask file of that LM, whose ranking
    is used).
    """
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "ranked":
        if masks_file is not None:
            raise ValueError(f"{path} is a ranked checkpoint: it carries its ranking, give no mask file")
        checkpoint = open_ranked(path)
        lm = resize(checkpoint, 1.0, dtype=dtype, device=device).lm
        return RankedLM(lm, checkpoint.ranking, open_tokenizer(path, kind), kind, ranked=True)
    if kind == "subnetwork":
        raise ValueError(f"{path} is a {kind}: give the full model (a fit or ranked checkpoint, or a model "
                         "with a mask file), not a sub-network")
    if kind != "fit" and masks_file is None:
        raise ValueError(f"{path} holds no ranking: pass a mask file (`ppn-bayes masks`) to cut drafts from it")
    lm, tokenizer, ranking = _open_full(path, kind, device=device, dtype=dtype, ranking=masks_file is None)
    if masks_file is not None:
        ranking = load_masks(masks_file, lm).ranking
    return RankedLM(lm, ranking, tokenizer, kind, ranked=False)


def export_masks(checkpoint: str | Path, out: str | Path, *, sizes: Iterable[float] = (),
                 n_params: Iterable[int] = (), overwrite: bool = False) -> MaskFile:
    """Write the mask file of a fit checkpoint or a ranked checkpoint, and return it loaded.

    A fit checkpoint gives the ranking at its guide's posterior median (the LM is loaded
    to identify it); a ranked checkpoint carries its ranking and the fitted LM's identity
    (nothing large is read), and its ranking is mapped back to the fitted LM's own unit
    order, so the file applies to the fitted LM either way.
    """
    sizes, n_params = list(sizes), list(n_params)
    if not sizes and not n_params:
        raise ValueError("ask for at least one size (--sizes) or parameter count (--params)")
    kind = checkpoint_kind(checkpoint)
    if kind == "ranked":
        ranked = open_ranked(checkpoint)
        save_masks(out, ranked.base_ranking(), sizes=sizes, n_params=n_params, identity=ranked.base_model,
                   overwrite=overwrite, source=str(checkpoint))
    elif kind == "fit":
        from ..core.adapters import refuse_adapters
        from ..train import load_fit

        refuse_adapters(recorded_size_rank(Path(checkpoint)), checkpoint, "a mask file (applied to the fitted LM's "
                        "own weights)")
        fitted = load_fit(checkpoint)
        save_masks(out, fitted.ranking(), sizes=sizes, n_params=n_params, lm=fitted.lm, overwrite=overwrite,
                   source=str(checkpoint))
    else:
        raise ValueError(f"{checkpoint} is a {kind} model, not a fit or ranked checkpoint: it has no ranking")
    return load_masks(out)
