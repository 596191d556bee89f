"""Baselines that ppn_bayes is measured against.

Structured, of the same granularity as ppn_bayes and with no training. Each returns a
:class:`~ppn_bayes.core.ranking.Ranking`, so masks, sizes and sliced sub-networks work exactly
as for a fitted push puppet network:

* :func:`shortgpt_ranking`: layer removal by block influence (ShortGPT),
  ``BI_l = 1 - E[cos(h_in, h_out)]`` over calibration tokens; layers are kept highest
  influence first, each layer's units right after it (whole layers);
* :func:`magnitude_ranking`: units by the mean squared magnitude of the weights they own;
* :func:`activation_ranking`: units by how strongly their outputs are activated on
  calibration tokens (:func:`activation_scores`); :func:`order_mlp_channels` first puts
  each layer's MLP channels in the order of their activation, a change of the LM's
  parameters that keeps its function, so that a unit of ``g`` consecutive channels holds
  channels of similar activation.

The two unit rankings respect the hierarchy through :func:`ranking_from_scores`: every
unit is ranked by its score and every layer just before its best unit. Scores of
different layers are on different scales (activation norms grow with depth), so
:func:`uniform_ranking_from_scores` offers the per-layer alternative of Wanda-sp and FLAP:
every layer cut by the same fraction, units ordered within their layer. A nested ranking
can only be uniform to within one unit a layer (with three KV groups a layer, the prefix
at 0.5 keeps two in some layers and one in the others); :func:`uniform_cut` keeps exactly
the same widths in every layer (Minitron's width cut), at the widths
:func:`uniform_widths` picks for a size.

Unstructured: :func:`sparse_prune` runs SparseGPT or Wanda through their maintained
implementation, llm-compressor (an optional dependency), at a given sparsity or 2:4.

This module imports neither pyro nor arviz: it runs on the GPU machine as it is.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from ..core.architecture import Architecture, Family, decoder_layers, describe, family_of, get_module
from ..core.budget import check_size
from ..core.ranking import Masks, Ranking
from ..data import TokenBlocks

__all__ = [
    "calibration_windows",
    "block_influence",
    "shortgpt_ranking",
    "magnitude_scores",
    "activation_column_scores",
    "unit_scores_from_columns",
    "activation_scores",
    "order_mlp_channels",
    "ranking_from_scores",
    "uniform_ranking_from_scores",
    "uniform_widths",
    "uniform_cut",
    "uniform_cut_for_size",
    "magnitude_ranking",
    "activation_ranking",
    "decoder_density",
    "SparsePruned",
    "sparse_prune",
    "SPARSE_METHODS",
]

#: llm-compressor modifiers by method name.
SPARSE_METHODS = ("sparsegpt", "wanda")


def calibration_windows(tokens: torch.Tensor, n_windows: int = 128, seq_len: int = 2048,
                        seed: int = 0) -> torch.Tensor:
    """``n_windows`` distinct non-overlapping windows ``[n, seq_len]`` of ``tokens [N]``,
    drawn with ``seed`` (the protocol: 128 windows of 2048 tokens, seed 0)."""
    windows = TokenBlocks(tokens, seq_len).windows()  # [W, T]
    if n_windows < 1 or n_windows > len(windows):
        raise ValueError(
            f"asked for {n_windows} calibration windows of {seq_len} tokens; the text has {len(windows)}"
        )
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order[:n_windows]]


def _device(lm: nn.Module) -> torch.device:
    return next(lm.parameters()).device


def _batches(windows: torch.Tensor, batch_size: int):
    if windows.dim() != 2:
        raise ValueError(f"calibration windows must be [n, seq_len], got shape {tuple(windows.shape)}")
    for start in range(0, len(windows), batch_size):
        yield windows[start:start + batch_size]


# -- ShortGPT: block influence ------------------------------------------------------------
@torch.no_grad()
def block_influence(lm: nn.Module, windows: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """``BI [L]``: one minus the mean cosine similarity between each decoder layer's input
    and output hidden states, over every token of ``windows [n, T]`` (ShortGPT).

    A layer that changes its input little (``BI`` near 0) is the first to go.
    """
    layers = decoder_layers(lm)
    device = _device(lm)
    total = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    inputs: dict[int, torch.Tensor] = {}

    def pre_hook(index):
        def hook(module, args, kwargs):
            inputs[index] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post_hook(index):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output  # [B, T, D]
            cos = torch.nn.functional.cosine_similarity(inputs.pop(index).float(), out.float(), dim=-1)
            total[index] += cos.double().sum().cpu()
        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(index), with_kwargs=True))
    was_training = lm.training
    lm.eval()
    try:
        for batch in _batches(windows, batch_size):
            lm(input_ids=batch.to(device), use_cache=False)
            count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        lm.train(was_training)
    return 1.0 - total / count


def shortgpt_ranking(arch: Architecture, influence: torch.Tensor) -> Ranking:
    """Whole layers, highest block influence kept first; a layer's units follow it.

    A prefix that ends inside a layer keeps that layer's first units (attention units,
    then MLP channel groups, in index order): at most one layer is partly kept.
    """
    influence = torch.as_tensor(influence, dtype=torch.float64).cpu()
    if influence.shape != (arch.n_layers,):
        raise ValueError(f"block influence of shape {tuple(influence.shape)}, expected ({arch.n_layers},)")
    layer_key = -influence  # [L]
    unit_key = layer_key[:, None].expand(arch.n_layers, arch.n_units).clone()  # [L, U]
    return _ranking(arch, layer_key, unit_key)


# -- per-unit scores of owned weights --------------------------------------------------------
def _out_in(module: nn.Module, family: Family) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (GPT-2's Conv1D stores it transposed)."""
    return family.out_in(module.weight.detach())


@torch.no_grad()
def _owned_sums(lm: nn.Module, arch: Architecture, element_score) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum [L, U], count [L, U])`` of ``element_score(layer, path, W)`` over the weights
    each unit owns. ``W`` is ``[out, in]``; ``element_score`` returns a tensor of its shape.

    Ownership as in :func:`~ppn_bayes.core.architecture.describe`: an attention unit owns the q
    rows of its heads, the k/v rows of its group and the matching o columns; an MLP unit
    owns ``g`` rows of every input projection and ``g`` columns of the output projection.
    """
    family = family_of(lm)
    L, A, M = arch.n_layers, arch.n_attention_units, arch.n_mlp_units
    hd, hpu, g = arch.head_dim, arch.heads_per_unit, arch.mlp_group
    total = torch.zeros(L, arch.n_units, dtype=torch.float64)
    count = torch.zeros(L, arch.n_units, dtype=torch.float64)

    def add(index, units, score, rows: bool, width: int):
        sums = (score.sum(1) if rows else score.sum(0)).double().cpu()  # [out] or [in]
        total[index, units] += sums.view(-1, width).sum(1)
        n = score.shape[1] if rows else score.shape[0]
        count[index, units] += n * width

    for index, layer in enumerate(decoder_layers(lm)):
        attention, mlp = slice(0, A), slice(A, A + M)
        scores = {}  # one score per projection: GPT-2's fused c_attn holds q, k and v
        for path, offset, rows in family.qkv_rows(n_heads=arch.n_heads, head_dim=hd, heads_per_unit=hpu):
            if path not in scores:
                scores[path] = element_score(index, path, _out_in(get_module(layer, path), family))  # [rows, D]
            add(index, attention, scores[path][offset:offset + A * rows], True, rows)
        weight = _out_in(get_module(layer, family.o), family)  # [D, H hd]
        add(index, attention, element_score(index, family.o, weight), False, hpu * hd)
        for path in family.mlp_in:
            weight = _out_in(get_module(layer, path), family)  # [I, D]
            add(index, mlp, element_score(index, path, weight), True, g)
        weight = _out_in(get_module(layer, family.mlp_out), family)  # [D, I]
        add(index, mlp, element_score(index, family.mlp_out, weight), False, g)
    return total, count


def magnitude_scores(lm: nn.Module, arch: Architecture) -> torch.Tensor:
    """``[L, U]``: the mean squared weight over the weights each unit owns."""
    total, count = _owned_sums(lm, arch, lambda index, path, weight: weight.float() ** 2)
    return total / count


@torch.no_grad()
def activation_column_scores(lm: nn.Module, windows: torch.Tensor, *,
                             batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attention [L, H·hd], mlp [L, I])``: how strongly each channel a unit outputs is
    activated over every token of the calibration ``windows [n, T]``: for the attention
    output projection's inputs (the query heads' outputs) the mean square, for the MLP
    output projection's inputs (the intermediate channels) the mean absolute value."""
    family = family_of(lm)
    layers = decoder_layers(lm)
    sums: dict[tuple[int, str], torch.Tensor] = {}
    tokens = 0

    def hook(key, power):
        def accumulate(module, args):
            x = args[0].detach().float()  # [B, T, in]
            values = (x.abs() ** power).sum(dim=tuple(range(x.dim() - 1))).double()  # [in]
            sums[key] = sums[key] + values if key in sums else values
        return accumulate

    handles = [get_module(layer, path).register_forward_pre_hook(hook((index, path), power))
               for index, layer in enumerate(layers) for path, power in ((family.o, 2), (family.mlp_out, 1))]
    device = _device(lm)
    was_training = lm.training
    lm.eval()
    try:
        for batch in _batches(windows, batch_size):
            lm(input_ids=batch.to(device), use_cache=False)
            tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        lm.train(was_training)
    return tuple(torch.stack([sums[(index, path)].cpu() / tokens for index in range(len(layers))])
                 for path in (family.o, family.mlp_out))


def unit_scores_from_columns(arch: Architecture, attention: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    """``[L, U]``: each unit's sum of its channels' scores (:func:`activation_column_scores`):
    ``attention [L, H·hd]`` over its query heads' channels (the mean squared norm of its
    output), ``mlp [L, I]`` over its ``g`` channels."""
    L, A, M = arch.n_layers, arch.n_attention_units, arch.n_mlp_units
    width = arch.heads_per_unit * arch.head_dim
    if tuple(attention.shape) != (L, A * width) or tuple(mlp.shape) != (L, M * arch.mlp_group):
        raise ValueError(f"column scores of shapes {tuple(attention.shape)} and {tuple(mlp.shape)} do not fit "
                         f"{L} layers of {A * width} attention and {M * arch.mlp_group} MLP channels")
    return torch.cat([attention.double().view(L, A, width).sum(2),
                      mlp.double().view(L, M, arch.mlp_group).sum(2)], dim=1)


def activation_scores(lm: nn.Module, arch: Architecture, windows: torch.Tensor, *,
                      batch_size: int = 8) -> torch.Tensor:
    """``[L, U]``: how strongly each unit is activated on the calibration ``windows``: an
    attention unit by the mean squared norm of its query heads' outputs, an MLP unit by the
    sum of its channels' mean absolute activations (the statistics of the reference
    uniform cut in ``../shared/experiments/width_kd.py``).

    Issue 15: the score before averaged the Wanda score ``|W_ij| · ‖X_j‖`` over every
    weight a unit owns. Its input-side weights (q/k/v rows, gate/up rows) all read the same
    features, so their Wanda score is their magnitude, and the score was mostly weight
    magnitude: the uniform cut at 0.497 read perplexity 34,534 where the cut by activations
    reads 404. Weighting the output columns alone by ``|W|`` still picks other KV groups
    than the activations do in 12 of SmolLM2's 30 layers, and read about 20,000 on two
    evaluation windows (the issue's report).
    """
    attention, mlp = activation_column_scores(lm, windows, batch_size=batch_size)
    return unit_scores_from_columns(arch, attention, mlp)


@torch.no_grad()
def order_mlp_channels(lm: nn.Module, mlp: torch.Tensor) -> torch.Tensor:
    """Permute each layer's MLP channels in place into descending order of ``mlp [L, I]``
    (per-channel scores; equal scores keep their order): the rows of the input
    projections (and their biases) and the columns of the output projection move
    together, so the LM computes the same function. MLP units are groups of ``g``
    consecutive channels: after this, the first ``m`` units of a layer are its ``m · g``
    best channels, and a cut by units is a cut by channels. Returns the scores in the new
    order ``[L, I]``."""
    family = family_of(lm)
    layers = decoder_layers(lm)
    mlp = torch.as_tensor(mlp, dtype=torch.float64).cpu()
    if mlp.dim() != 2 or mlp.shape[0] != len(layers):
        raise ValueError(f"channel scores of shape {tuple(mlp.shape)} for {len(layers)} layers")
    out_dim, in_dim = family.weight_dims
    for index, layer in enumerate(layers):
        order = mlp[index].argsort(descending=True, stable=True)
        for path, dim in ((p, out_dim) for p in family.mlp_in):
            module = get_module(layer, path)
            if module.weight.shape[dim] != len(order):
                raise ValueError(f"layer {index}: {path} has {module.weight.shape[dim]} channels, "
                                 f"the scores {len(order)}")
            module.weight.data = module.weight.data.index_select(dim, order.to(module.weight.device))
            if module.bias is not None:
                module.bias.data = module.bias.data.index_select(0, order.to(module.bias.device))
        module = get_module(layer, family.mlp_out)
        module.weight.data = module.weight.data.index_select(in_dim, order.to(module.weight.device))
    return mlp.sort(dim=1, descending=True, stable=True).values


# -- from scores to a ranking -----------------------------------------------------------------
def _ranking(arch: Architecture, layer_key: torch.Tensor, unit_key: torch.Tensor) -> Ranking:
    # The one place that builds a Ranking from keys (smaller key: kept earlier).
    return Ranking._from_keys(arch, layer_key.double(), unit_key.double())


def _checked_scores(arch: Architecture, scores: torch.Tensor) -> torch.Tensor:
    """``scores`` as float64 ``[L, U]`` on the CPU, or a ValueError naming what is wrong."""
    scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
    if scores.shape != (arch.n_layers, arch.n_units):
        raise ValueError(f"scores of shape {tuple(scores.shape)}, expected ({arch.n_layers}, {arch.n_units})")
    if not torch.isfinite(scores).all():
        raise ValueError("unit scores must be finite")
    return scores


def ranking_from_scores(arch: Architecture, scores: torch.Tensor) -> Ranking:
    """A ranking from unit scores ``[L, U]`` (higher: kept earlier) that respects the
    hierarchy: each unit ranks by its score, each layer just before its best unit."""
    scores = _checked_scores(arch, scores)
    unit_key = -scores  # [L, U]
    layer_key = unit_key.min(dim=1).values  # [L]: the key of the layer's best unit
    return _ranking(arch, layer_key, unit_key)


def uniform_ranking_from_scores(arch: Architecture, scores: torch.Tensor) -> Ranking:
    """A ranking that cuts every layer by the same fraction (Wanda-sp, FLAP's uniform
    setting): within each layer, attention units and MLP units are ordered by ``scores
    [L, U]`` (higher: kept earlier) separately, and a unit's key is its rank fraction
    ``(r + ½) / n`` in its group, so every prefix keeps about the same share of each
    layer's attention and MLP units. Scores of different layers are never compared: their
    scales differ (activation norms grow with depth). Each layer comes just before its
    best unit; equal keys keep earlier layers first."""
    scores = _checked_scores(arch, scores)
    L, A = arch.n_layers, arch.n_attention_units
    unit_key = torch.empty_like(scores)  # [L, U]
    for group in (slice(0, A), slice(A, arch.n_units)):
        block = scores[:, group]  # [L, n]
        n = block.shape[1]
        if n == 0:
            continue
        order = block.argsort(dim=1, descending=True, stable=True)  # [L, n]
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand(L, n).contiguous())
        unit_key[:, group] = (ranks.double() + 0.5) / n
    return _ranking(arch, unit_key.min(dim=1).values, unit_key)


# -- the uniform width cut (Minitron-style): the same widths in every layer ------------------------
def uniform_widths(arch: Architecture, size: float) -> tuple[int, int]:
    """``(a, m)``: the attention units and MLP units every layer keeps in the uniform cut
    whose size is the closest to ``size`` without exceeding it (all layers kept).

    The budget is ``int(size · C)`` parameters, as for :meth:`Ranking.masks`. Both widths
    are at least one. Of two shapes of the same cost the more even one wins (``a / A``
    closest to ``m / M``), then the one with more attention units. Raises ``ValueError``
    when even one unit of each kind per layer exceeds the budget.
    """
    size = check_size(size)
    A, M = arch.n_attention_units, arch.n_mlp_units
    if A < 1 or M < 1:
        raise ValueError(f"a uniform cut needs attention and MLP units; this LM has {A} and {M} a layer")
    layer_cost, unit_cost = arch.costs(dtype=torch.int64)
    attention = unit_cost[:, :A].cumsum(1)  # [L, A]: a layer's cost of its first a+1 attention units
    mlp = unit_cost[:, A:].cumsum(1)  # [L, M]
    budget = int(size * arch.total_cost)
    best = None
    for a in range(1, A + 1):
        for m in range(1, M + 1):
            cost = int(layer_cost.sum() + attention[:, a - 1].sum() + mlp[:, m - 1].sum())
            if cost > budget:
                break
            key = (cost, -abs(a / A - m / M), a)
            if best is None or key > best[0]:
                best = (key, (a, m))
    if best is None:
        smallest = int(layer_cost.sum() + attention[:, 0].sum() + mlp[:, 0].sum())
        raise ValueError(f"size {size} is below the smallest uniform cut (one attention and one MLP unit a "
                         f"layer: {smallest / arch.total_cost:.4f})")
    return best[1]


def uniform_cut(arch: Architecture, scores: torch.Tensor, attention_units: int, mlp_units: int, *,
                size_requested: float | None = None) -> Masks:
    """Masks that keep every layer, and in each its ``attention_units`` best attention
    units and ``mlp_units`` best MLP units by ``scores [L, U]`` (higher: kept; equal
    scores keep the lower index). Scores of different layers are never compared."""
    scores = _checked_scores(arch, scores)
    L, A, M = arch.n_layers, arch.n_attention_units, arch.n_mlp_units
    if not (1 <= attention_units <= A and 1 <= mlp_units <= M):
        raise ValueError(f"a uniform cut keeps 1 to {A} attention units and 1 to {M} MLP units a layer, "
                         f"got {attention_units} and {mlp_units}")
    unit = torch.zeros(L, A + M, dtype=torch.bool)
    for group, keep in ((slice(0, A), attention_units), (slice(A, A + M), mlp_units)):
        order = scores[:, group].argsort(dim=1, descending=True, stable=True)[:, :keep]  # [L, keep]
        unit[:, group] = torch.zeros(L, group.stop - group.start, dtype=torch.bool).scatter_(1, order, True)
    layer_cost, unit_cost = arch.costs(dtype=torch.int64)
    kept = int(layer_cost.sum() + unit_cost[unit].sum())
    return Masks(arch=arch, layer=torch.ones(L, dtype=torch.bool), unit=unit,
                 size_requested=size_requested if size_requested is not None else kept / arch.total_cost,
                 kept_params=kept, total_params=arch.total_cost)


def uniform_cut_for_size(arch: Architecture, scores: torch.Tensor, size: float) -> Masks:
    """:func:`uniform_cut` at the widths of :func:`uniform_widths` for ``size``."""
    a, m = uniform_widths(arch, size)
    return uniform_cut(arch, scores, a, m, size_requested=size)


def magnitude_ranking(lm: nn.Module, arch: Architecture | None = None, *, mlp_group: int = 64) -> Ranking:
    """Units by the magnitude of their weights (no data), layers before their best unit."""
    arch = arch if arch is not None else describe(lm, mlp_group=mlp_group)
    return ranking_from_scores(arch, magnitude_scores(lm, arch))


def activation_ranking(lm: nn.Module, windows: torch.Tensor, arch: Architecture | None = None, *,
                       mlp_group: int = 64, batch_size: int = 8) -> Ranking:
    """Units by their Wanda-style activation-weighted magnitude on calibration ``windows``."""
    arch = arch if arch is not None else describe(lm, mlp_group=mlp_group)
    return ranking_from_scores(arch, activation_scores(lm, arch, windows, batch_size=batch_size))


# -- unstructured: SparseGPT and Wanda through llm-compressor ----------------------------------
def decoder_density(lm: nn.Module, arch: Architecture | None = None, *, mlp_group: int = 64) -> float:
    """The fraction of decoder parameters that are not exactly zero: the size reached by
    an unstructured sparse model (embeddings and the LM head excluded, as for every size)."""
    arch = arch if arch is not None else describe(lm, mlp_group=mlp_group)
    nonzero = sum(int(torch.count_nonzero(p.detach())) for layer in decoder_layers(lm)
                  for p in layer.parameters())
    return nonzero / arch.total_cost


@dataclass(frozen=True)
class SparsePruned:
    """An LM pruned in place by :func:`sparse_prune`, and what was asked and reached."""

    lm: nn.Module
    method: str
    sparsity: float
    mask_structure: str
    size_reached: float
    calibration_windows: int
    calibration_seq_len: int


class _Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, index):
        ids = self.windows[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _remove_offloading(lm: nn.Module) -> None:
    """Undo the onload/offload wrapping llm-compressor's sequential pipeline puts on every
    module (compressed-tensors' ``OffloadCache``): the pruned LM is a plain module again."""
    try:
        from compressed_tensors.offload import remove_dispatch
    except ImportError:  # pragma: no cover - older compressed-tensors
        return
    remove_dispatch(lm, onload_tensors=True)


def sparse_prune(lm: nn.Module, tokenizer, windows: torch.Tensor, *, method: str, sparsity: float = 0.5,
                 mask_structure: str = "0:0", arch: Architecture | None = None) -> SparsePruned:
    """Prune ``lm`` in place with SparseGPT or Wanda as llm-compressor implements them.

    ``method`` is ``'sparsegpt'`` or ``'wanda'``; ``sparsity`` the fraction of each
    decoder linear layer's weights set to zero (``1 - size``); ``mask_structure`` ``'0:0'``
    for unstructured or ``'2:4'`` (then ``sparsity`` must be 0.5). Calibration reads
    ``windows [n, T]`` (the protocol: :func:`calibration_windows` of the training text).
    The LM head is left dense, as is everything outside the decoder. Needs
    ``pip install llmcompressor`` (``ppn-bayes[baselines]``).
    """
    if method not in SPARSE_METHODS:
        raise ValueError(f"method must be one of {SPARSE_METHODS}, got {method!r}")
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must lie in (0, 1), got {sparsity}")
    if mask_structure not in ("0:0", "2:4"):
        raise ValueError(f"mask_structure must be '0:0' (unstructured) or '2:4', got {mask_structure!r}")
    if mask_structure == "2:4" and abs(sparsity - 0.5) > 1e-9:
        raise ValueError(f"2:4 sparsity is 0.5, got {sparsity}")
    if tokenizer is None:
        raise ValueError("llm-compressor needs the tokenizer passed explicitly")
    try:
        from llmcompressor import oneshot
        from llmcompressor.core import reset_session
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    except ImportError as err:
        raise ImportError(
            f"SparseGPT and Wanda run through llm-compressor, which is not importable ({err}); "
            "install it with `pip install llmcompressor` (see benchmarks/README.md for the GPU machine)"
        ) from None
    arch = arch if arch is not None else describe(lm)
    modifier = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[method]
    recipe = modifier(sparsity=sparsity, mask_structure=mask_structure, targets=["Linear"],
                      ignore=["re:.*lm_head"])
    loader = torch.utils.data.DataLoader(_Windows(windows.cpu()), batch_size=1, shuffle=False)
    device = _device(lm)
    was_training = lm.training
    lm.eval()
    # oneshot re-reads the config from ``config.name_or_path`` (to refuse quantised
    # checkpoints): point it at a plain copy of the config for the duration of the call.
    name_or_path = lm.config.name_or_path
    with tempfile.TemporaryDirectory(prefix="ppn-bayes-llmc-") as config_dir:
        lm.config.save_pretrained(config_dir)
        lm.config.name_or_path = config_dir
        reset_session()
        try:
            oneshot(model=lm, tokenizer=tokenizer, dataset=loader, recipe=recipe,
                    num_calibration_samples=len(windows), max_seq_length=windows.shape[1])
        finally:
            reset_session()
            lm.config.name_or_path = name_or_path
            _remove_offloading(lm)
    lm.to(device).train(was_training)
    size_reached = decoder_density(lm, arch)
    if size_reached > 1 - 0.5 * sparsity:
        raise RuntimeError(
            f"{method} at sparsity {sparsity} left {size_reached:.3f} of the decoder's weights non-zero: "
            "llm-compressor did not prune"
        )
    return SparsePruned(lm=lm, method=method, sparsity=sparsity, mask_structure=mask_structure,
                        size_reached=size_reached, calibration_windows=len(windows),
                        calibration_seq_len=int(windows.shape[1]))
