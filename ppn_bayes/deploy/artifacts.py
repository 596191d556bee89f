"""Where a path becomes an object: what kind of file or folder it is, and opening it.

:func:`checkpoint_kind` tells a ranked checkpoint, a fit checkpoint, a sub-network, a
Hugging Face directory and a GGUF file apart; :func:`open_model` opens any of them (cut to
a size when asked), :func:`resize_checkpoint` resizes a fit or ranked checkpoint and
:func:`export_masks` writes the mask file of either. The modules below take objects.
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
from ..core.ranking import Masks
from .resize import INDEX_FILE, ResizeResult, export_ranked, open_ranked, resize, tokenizer_files

__all__ = ["checkpoint_kind", "resize_checkpoint", "OpenedModel", "open_model", "export_masks"]


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


def resize_checkpoint(checkpoint: str | Path, out: str | Path, *, size: float | None = None,
                      n_params: int | None = None, overwrite: bool = False, keep_ranked: str | Path | None = None,
                      dtype: torch.dtype | None = None) -> ResizeResult:
    """:func:`resize` a ranked checkpoint, or a fit checkpoint through a ranked one.

    A fit checkpoint is first exported with :func:`export_ranked` (which loads the full
    LM) to ``keep_ranked``, or to a temporary directory removed afterwards; export once
    and resize the ranked checkpoint to avoid loading the full LM at every size.
    """
    kind = checkpoint_kind(checkpoint)
    if kind == "ranked":
        return resize(checkpoint, size, out, n_params=n_params, overwrite=overwrite, dtype=dtype)
    if kind != "fit":
        raise ValueError(f"{checkpoint} is a {kind} model, not a fit or ranked checkpoint: nothing to resize")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if keep_ranked is not None:
        ranked = export_ranked(checkpoint, keep_ranked, overwrite=overwrite)
        return resize(ranked, size, out, n_params=n_params, overwrite=overwrite, dtype=dtype)
    import tempfile

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ranked.", dir=Path(out).parent) as tmp:
        ranked = export_ranked(checkpoint, Path(tmp) / "ranked")
        return resize(ranked, size, out, n_params=n_params, overwrite=overwrite, dtype=dtype)


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
    from ..lm import load_lm, load_tokenizer
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
        tokenizer_dir = path / "tokenizer"
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None
        return OpenedModel(result.lm, tokenizer, kind, checkpoint.masks(size, n_params=n_params))
    if kind == "subnetwork":
        if wants_cut:
            raise ValueError(f"{path} is already a sub-network: it cannot be cut again")
        lm = load_subnetwork(path, device=device, dtype=dtype)
        return OpenedModel(lm, load_tokenizer(path), kind)
    if kind == "fit":
        from ..train import load_fit

        fitted = load_fit(path, device=device, dtype=dtype)
        lm = fitted.lm
        tokenizer_dir = path / "lm"
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_files(tokenizer_dir) is not None else None
        ranking = fitted.ranking() if masks_file is None else None
    else:
        lm, tokenizer = load_lm(path, dtype=dtype, device=device)
        ranking = None
        if wants_cut and masks_file is None:
            raise ValueError(f"{path} holds no ranking: pass a mask file to cut it")
    if not wants_cut:
        return OpenedModel(lm, tokenizer, kind)
    if masks_file is not None:
        masks = load_masks(masks_file, lm).masks_for(size, n_params=n_params)
    else:
        masks = ranking.masks(size) if size is not None else ranking.masks_for_params(int(n_params))
    if masked_dense:
        return OpenedModel(lm, tokenizer, kind, masks, masked_dense=True)
    sub = build_subnetwork(lm, masks)
    del lm
    return OpenedModel(sub, tokenizer, kind, masks)


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
        from ..train import load_fit

        fitted = load_fit(checkpoint)
        save_masks(out, fitted.ranking(), sizes=sizes, n_params=n_params, lm=fitted.lm, overwrite=overwrite,
                   source=str(checkpoint))
    else:
        raise ValueError(f"{checkpoint} is a {kind} model, not a fit or ranked checkpoint: it has no ranking")
    return load_masks(out)
