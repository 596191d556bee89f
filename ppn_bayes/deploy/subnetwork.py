"""The sub-network: a dense LM with what the masks drop physically removed.

For hard masks (:class:`~ppn_bayes.core.ranking.Masks`), :func:`build_subnetwork` returns a new
Hugging Face LM in which

* dropped layers are gone (the kept ones re-indexed, so caches line up: ``layer_idx``,
  ``config.num_hidden_layers`` and per-layer config lists such as ``layer_types``);
* a kept layer holds only its kept attention units (q/k/v rows, o columns; GPT-2: the
  q, k and v columns of the fused ``c_attn`` and the rows of ``c_proj``) and its kept MLP
  units (gate/up rows, down columns; GPT-2: ``c_fc`` columns, ``c_proj`` rows).

Its logits equal the masked full LM's (:class:`~ppn_bayes.core.gating.GatedLM` under
``masks.gates()``, the slow masked-dense reference), and it is an ordinary module:
``torch.compile``, static KV caches and ``generate`` work on it.

How it is built (:func:`build_from_source`, the one builder): a skeleton of the
sub-network is made on the ``meta`` device from the config (no memory), each layer is
narrowed to its own widths (one narrowing function per module type, keeping
``in_features``/``out_features`` in step with the weights), and every tensor is then
filled from a :class:`TensorSource`, which gives a full LM's tensor by name, whole or cut
to the rows or columns asked for. Three sources:

* :class:`LMTensors`: an LM in memory, copied (:func:`build_subnetwork`);
* ``RankedTensors`` (:mod:`ppn_bayes.deploy.resize`): slices of a ranked safetensors
  checkpoint, read from disk (``resize``);
* :class:`SharedTensors`: views that share an LM's storage where the cut is a prefix
  (the drafts of :func:`ppn_bayes.decode.speculative.shared_draft`).

Which rows or columns of which source tensor fill a sub-network tensor is a pure function
of the family and the kept units (:func:`tensor_plan`), the same for every source.

Per-layer widths are first-class data (:class:`Widths`), stored in the saved config as
``ppn_widths``. When every layer keeps the same widths and the family's config can say
so, the global config fields are set as well and the saved directory loads with plain
``AutoModelForCausalLM.from_pretrained``; otherwise :func:`load_subnetwork` rebuilds it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import torch
from torch import nn

from ..core.architecture import Architecture, Family, FAMILIES, decoder_layers, describe, get_module
from ..io import FileFormatError, atomic_directory

__all__ = [
    "Widths",
    "Selection",
    "Take",
    "EmptyAttention",
    "EmptyMLP",
    "build_subnetwork",
    "build_from_source",
    "TensorSource",
    "LMTensors",
    "SharedTensors",
    "selection_from_masks",
    "idle_layers",
    "tensor_plan",
    "subnetwork_widths",
    "decoder_params",
    "held_params",
    "save_subnetwork",
    "load_subnetwork",
    "WIDTHS_VERSION",
    # the builder's steps (the first four also check and write ranked checkpoints in ppn_bayes.deploy.resize)
    "layer_rules",
    "empty_subnetwork",
    "tensor_groups",
    "is_parameter",
    "fill_tensors",
    "take_rows",
    "fold_layer_scale",
    "materialise_buffers",
    "finish_subnetwork",
]

WIDTHS_VERSION = 1


# -- what is kept -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """The units a sub-network keeps, in the order its tensors hold them.

    ``layers[j]`` is the base LM's index of the sub-network's layer ``j``;
    ``attention[j]`` and ``mlp[j]`` list the base LM's attention units (``0..A-1``) and
    MLP units (``0..M-1``) of that layer, in the order they are laid out in the
    sub-network's tensors (ascending for a sub-network, by rank for a ranked checkpoint).
    """

    layers: tuple[int, ...]
    attention: tuple[tuple[int, ...], ...]
    mlp: tuple[tuple[int, ...], ...]

    def without(self, positions: Iterable[int]) -> "Selection":
        """This selection less the kept layers at ``positions`` (indices into :attr:`layers`)."""
        drop = set(positions)
        keep = [j for j in range(len(self.layers)) if j not in drop]
        return Selection(layers=tuple(self.layers[j] for j in keep),
                         attention=tuple(self.attention[j] for j in keep), mlp=tuple(self.mlp[j] for j in keep))

    def widths(self, arch: Architecture) -> "Widths":
        """The per-layer widths of this selection."""
        return Widths(
            source_layers=self.layers,
            attention_units=tuple(len(a) for a in self.attention),
            mlp_units=tuple(len(m) for m in self.mlp),
            heads_per_unit=arch.heads_per_unit,
            head_dim=arch.head_dim,
            mlp_group=arch.mlp_group,
            base_layers=arch.n_layers,
        )


def selection_from_masks(masks) -> Selection:
    """The :class:`Selection` of hard ``masks``, checked for the hierarchy.

    Raises ``ValueError`` when a unit is kept in a dropped layer or no layer is kept.
    """
    arch = masks.arch
    L, A, U = arch.n_layers, arch.n_attention_units, arch.n_units
    layer = torch.as_tensor(masks.layer).bool().cpu()
    unit = torch.as_tensor(masks.unit).bool().cpu()
    if tuple(layer.shape) != (L,) or tuple(unit.shape) != (L, U):
        raise ValueError(
            f"masks of shape layer {tuple(layer.shape)}, unit {tuple(unit.shape)} do not fit "
            f"{L} layers x {U} units"
        )
    orphans = (unit & ~layer[:, None]).nonzero().tolist()
    if orphans:
        raise ValueError(f"masks keep units of dropped layers (layer, unit): {orphans[:5]}")
    kept = layer.nonzero().flatten().tolist()
    if not kept:
        raise ValueError("masks keep no layer: a sub-network needs at least one")
    return Selection(
        layers=tuple(kept),
        attention=tuple(tuple(unit[l, :A].nonzero().flatten().tolist()) for l in kept),
        mlp=tuple(tuple(unit[l, A:].nonzero().flatten().tolist()) for l in kept),
    )


@dataclass(frozen=True)
class Widths:
    """Per-layer widths of a sub-network (saved as ``config.ppn_widths``).

    ``source_layers [J]``: the base LM's index of each kept layer; ``attention_units
    [J]`` and ``mlp_units [J]``: units each kept layer holds. A layer with ``a``
    attention units has ``a`` key/value heads and ``a * heads_per_unit`` query heads; one
    with ``m`` MLP units has ``m * mlp_group`` intermediate channels.
    """

    source_layers: tuple[int, ...]
    attention_units: tuple[int, ...]
    mlp_units: tuple[int, ...]
    heads_per_unit: int
    head_dim: int
    mlp_group: int
    base_layers: int

    @property
    def uniform(self) -> bool:
        """Every layer keeps the same, non-zero, widths."""
        return (len(set(self.attention_units)) == 1 and len(set(self.mlp_units)) == 1
                and self.attention_units[0] > 0 and self.mlp_units[0] > 0)

    def to_dict(self) -> dict:
        """A JSON-ready dict with a ``version`` field."""
        return {"version": WIDTHS_VERSION, **{k: list(v) if isinstance(v, tuple) else v
                                               for k, v in asdict(self).items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Widths":
        """Read and check a dict written by :meth:`to_dict`; ``ValueError`` if it is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError("ppn_widths must be a JSON object")
        if data.get("version") != WIDTHS_VERSION:
            raise ValueError(f"ppn_widths version {data.get('version')!r}; this ppn_bayes reads {WIDTHS_VERSION}")
        try:
            widths = cls(
                source_layers=tuple(_int(x) for x in data["source_layers"]),
                attention_units=tuple(_int(x) for x in data["attention_units"]),
                mlp_units=tuple(_int(x) for x in data["mlp_units"]),
                heads_per_unit=_int(data["heads_per_unit"]),
                head_dim=_int(data["head_dim"]),
                mlp_group=_int(data["mlp_group"]),
                base_layers=_int(data["base_layers"]),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"ppn_widths is incomplete or malformed ({err!r})") from None
        J = len(widths.source_layers)
        if J == 0 or len(widths.attention_units) != J or len(widths.mlp_units) != J:
            raise ValueError("ppn_widths: source_layers, attention_units and mlp_units must have one "
                             "entry per kept layer")
        if min(widths.attention_units + widths.mlp_units) < 0 or min(
                widths.heads_per_unit, widths.head_dim, widths.mlp_group) < 1:
            raise ValueError("ppn_widths holds a negative width")
        if list(widths.source_layers) != sorted(set(widths.source_layers)) or \
                not 0 <= widths.source_layers[0] <= widths.source_layers[-1] < widths.base_layers:
            raise ValueError("ppn_widths: source_layers must be increasing indices of the base LM's layers")
        return widths


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


# -- which source rows/columns fill which tensor ---------------------------------------------
@dataclass(frozen=True)
class Take:
    """Where one sub-network tensor comes from: ``source`` tensor, cut along ``dim``
    to the concatenation of the half-open index ``ranges`` (``dim=None``: the whole
    tensor)."""

    source: str
    dim: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()

    def length(self) -> int:
        """Indices taken along ``dim``."""
        return sum(b - a for a, b in self.ranges)


def _coalesce(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _unit_ranges(units: Sequence[int], width: int, offset: int = 0) -> tuple[tuple[int, int], ...]:
    return _coalesce((offset + u * width, offset + (u + 1) * width) for u in units)


def layer_rules(family: Family, arch: Architecture, attention: Sequence[int], mlp: Sequence[int]) -> dict:
    """``{name within the layer: (dim, ranges)}`` for the tensors a layer's units cut."""
    hd, hpu, g = arch.head_dim, arch.heads_per_unit, arch.mlp_group
    q_ranges = _unit_ranges(attention, hpu * hd)  # query heads of the kept units (= o's inputs)
    mlp_ranges = _unit_ranges(mlp, g)
    rules: dict[str, tuple[int, tuple]] = {}
    out_dim, in_dim = family.weight_dims
    qkv: dict[str, tuple] = {}
    for path, offset, rows in family.qkv_rows(n_heads=arch.n_heads, head_dim=hd, heads_per_unit=hpu):
        qkv[path] = qkv.get(path, ()) + _unit_ranges(attention, rows, offset)
    for path, ranges in qkv.items():
        rules[f"{path}.weight"] = (out_dim, _coalesce(ranges))
        rules[f"{path}.bias"] = (0, _coalesce(ranges))
    rules[f"{family.o}.weight"] = (in_dim, q_ranges)
    for path in family.mlp_in:
        rules[f"{path}.weight"] = (out_dim, mlp_ranges)
        rules[f"{path}.bias"] = (0, mlp_ranges)
    rules[f"{family.mlp_out}.weight"] = (in_dim, mlp_ranges)
    return rules


def tensor_plan(arch: Architecture, selection: Selection, names: Iterable[str]) -> dict[str, Take]:
    """For each sub-network tensor name, the :class:`Take` that fills it.

    ``names`` are the sub-network's tensor names (its layers numbered ``0..J-1``); the
    sources are the base LM's names (its layers numbered as in the base). Tensors outside
    the decoder layers, and a layer's norms and output biases, are taken whole.
    """
    family = FAMILIES[arch.family]
    prefix = family.layers + "."
    rules = [layer_rules(family, arch, a, m) for a, m in zip(selection.attention, selection.mlp)]
    plan = {}
    for name in names:
        if not name.startswith(prefix):
            plan[name] = Take(name)
            continue
        index, _, rest = name[len(prefix):].partition(".")
        j = int(index)
        source = f"{prefix}{selection.layers[j]}.{rest}"
        if rest in rules[j]:
            dim, ranges = rules[j][rest]
            plan[name] = Take(source, dim, ranges)
        else:
            plan[name] = Take(source)
    return plan


# -- narrowing modules (shapes and attributes only; the weights come from the plan) -----------
def _empty_like(param: torch.Tensor | None, shape) -> nn.Parameter | None:
    if param is None:
        return None
    return nn.Parameter(torch.empty(shape, dtype=param.dtype, device=param.device), requires_grad=False)


def narrow_linear(linear: nn.Linear, *, in_features: int | None = None, out_features: int | None = None) -> None:
    """Give ``linear`` new feature counts (weights left empty), keeping its attributes in step."""
    out_f = linear.out_features if out_features is None else out_features
    in_f = linear.in_features if in_features is None else in_features
    linear.weight = _empty_like(linear.weight, (out_f, in_f))
    if linear.bias is not None:
        linear.bias = _empty_like(linear.bias, (out_f,))
    linear.in_features, linear.out_features = in_f, out_f


def narrow_conv1d(conv: nn.Module, *, nx: int | None = None, nf: int | None = None) -> None:
    """The same for GPT-2's ``Conv1D`` (weight ``[nx, nf]``: inputs by outputs)."""
    nx = conv.nx if nx is None else nx
    nf = conv.nf if nf is None else nf
    conv.weight = _empty_like(conv.weight, (nx, nf))
    conv.bias = _empty_like(conv.bias, (nf,))
    conv.nx, conv.nf = nx, nf


def _narrow_projection(module: nn.Module, family: Family, *, inputs: int | None = None,
                       outputs: int | None = None) -> None:
    if family.conv1d:
        narrow_conv1d(module, nx=inputs, nf=outputs)
    else:
        narrow_linear(module, in_features=inputs, out_features=outputs)


def _output_of_nothing(projection: nn.Module, family: Family, like: torch.Tensor) -> torch.Tensor:
    """What a projection with no inputs outputs: its bias, or zeros ``[*like[:-1], out]``."""
    output = like.new_zeros(*like.shape[:-1], family.out_features(projection.weight))
    bias = getattr(projection, "bias", None)
    return output + bias.to(output.dtype) if bias is not None else output


class EmptyAttention(nn.Module):
    """The attention of a kept layer that keeps no attention unit.

    Its output is the output projection applied to nothing: the projection's bias (GPT-2)
    or zeros, exactly what the masked LM computes. It holds the layer's zero-width
    projections (and any norms) under their usual names, so the state dict keeps its
    layout, and it appends empty keys and values to a cache so that every layer of the
    cache counts the same positions.
    """

    def __init__(self, attention: nn.Module, family: Family, head_dim: int):
        super().__init__()
        for name, child in attention.named_children():
            self.add_module(name, child)
        self.layer_idx = attention.layer_idx
        self.head_dim = head_dim
        self.family = family
        self._output = family.o.rsplit(".", 1)[-1]

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, **kwargs):
        """``(output [B, T, H], None)``, as the attention modules of transformers return."""
        if past_key_values is not None:
            cache = getattr(past_key_values, "self_attention_cache", past_key_values)
            B, T = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(B, 0, T, self.head_dim)  # [B, kv heads = 0, T, D]
            cache.update(empty, empty, self.layer_idx)
        return _output_of_nothing(getattr(self, self._output), self.family, hidden_states), None


class EmptyMLP(nn.Module):
    """The MLP of a kept layer that keeps no MLP unit: it adds its output projection's bias
    (GPT-2) or zeros, as the masked LM does. Its zero-width projections keep their names."""

    def __init__(self, mlp: nn.Module, family: Family):
        super().__init__()
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.family = family
        self._output = family.mlp_out.rsplit(".", 1)[-1]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``output [B, T, H]``."""
        return _output_of_nothing(getattr(self, self._output), self.family, hidden_states)


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (get_module(root, parent) if parent else root), name


def narrow_attention(layer: nn.Module, family: Family, *, units: int, heads_per_unit: int, head_dim: int) -> None:
    """Narrow layer ``layer``'s attention to ``units`` key/value groups (and their query
    heads); with ``units = 0`` it becomes an :class:`EmptyAttention`."""
    heads = units * heads_per_unit
    outputs = family.qkv_outputs(units=units, heads_per_unit=heads_per_unit, head_dim=head_dim, n_heads=heads)
    for path, width in outputs.items():
        _narrow_projection(get_module(layer, path), family, outputs=width)
    _narrow_projection(get_module(layer, family.o), family, inputs=heads * head_dim)
    parent, name = _parent(layer, family.o.rpartition(".")[0])
    attention = getattr(parent, name)
    for field, value in family.attention_fields(heads=heads, head_dim=head_dim).items():
        setattr(attention, field, value)
    # Llama-style attention repeats keys by num_key_value_groups = heads / kv heads, which
    # stays heads_per_unit: nothing to change.
    if units == 0:
        setattr(parent, name, EmptyAttention(attention, family, head_dim))


def narrow_mlp(layer: nn.Module, family: Family, *, channels: int) -> None:
    """Narrow layer ``layer``'s MLP to ``channels`` intermediate channels; with 0 it
    becomes an :class:`EmptyMLP`."""
    for path in family.mlp_in:
        _narrow_projection(get_module(layer, path), family, outputs=channels)
    _narrow_projection(get_module(layer, family.mlp_out), family, inputs=channels)
    if channels == 0:
        parent, name = _parent(layer, family.mlp_out.rpartition(".")[0])
        setattr(parent, name, EmptyMLP(getattr(parent, name), family))


# -- the skeleton: a sub-network on the meta device -------------------------------------------
def _uniform_fields(family: Family, widths: Widths, config) -> dict | None:
    """Global config fields that describe every layer, or ``None`` if the config cannot."""
    if not widths.uniform:
        return None
    return family.uniform_config_fields(config, heads=widths.attention_units[0] * widths.heads_per_unit,
                                        kv_heads=widths.attention_units[0],
                                        intermediate=widths.mlp_units[0] * widths.mlp_group, head_dim=widths.head_dim)


def subnetwork_config(base_config, family: Family, widths: Widths):
    """The config of a sub-network of ``base_config`` with ``widths`` (a new object)."""
    config = copy.deepcopy(base_config)
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = len(widths.source_layers)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == widths.base_layers:
        config.layer_types = [layer_types[l] for l in widths.source_layers]
    uniform = _uniform_fields(family, widths, config)
    for key, value in (uniform or {}).items():
        setattr(config, key, value)
    config.ppn_widths = widths.to_dict()
    return config


def empty_subnetwork(config, family: Family, widths: Widths, attn_implementation: str | None = None) -> nn.Module:
    """The sub-network's modules on the meta device, every layer narrowed to its widths;
    :func:`fill_tensors` then gives them values."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, **kwargs)
    layers = decoder_layers(lm)
    if len(layers) != len(widths.source_layers):
        raise FileFormatError(f"config builds {len(layers)} layers, ppn_widths lists {len(widths.source_layers)}")
    for j, layer in enumerate(layers):
        narrow_attention(layer, family, units=widths.attention_units[j], heads_per_unit=widths.heads_per_unit,
                         head_dim=widths.head_dim)
        narrow_mlp(layer, family, channels=widths.mlp_units[j] * widths.mlp_group)
    return lm


@torch.no_grad()
def fold_layer_scale(lm: nn.Module, family: Family, widths: Widths) -> None:
    """A family may scale attention logits by ``1/(layer index + 1)`` (GPT-2's
    ``scale_attn_by_inverse_layer_idx``: :meth:`Family.scales_attention_by_layer`). A kept layer's index
    changes (``l`` to ``j``), so its queries are multiplied by ``(j + 1)/(l + 1)``: the
    logits keep the base layer's scale, and the config stays true for any loader."""
    if not family.scales_attention_by_layer(lm.config):
        return
    out_dim = family.weight_dims[0]
    for j, layer in enumerate(decoder_layers(lm)):
        source = widths.source_layers[j]
        if source == j:
            continue
        queries = widths.attention_units[j] * widths.heads_per_unit * widths.head_dim
        q = get_module(layer, family.q)  # the query rows come first (GPT-2: q | k | v)
        q.weight.narrow(out_dim, 0, queries).mul_((j + 1) / (source + 1))
        if q.bias is not None:
            q.bias[:queries] *= (j + 1) / (source + 1)


def tensor_groups(lm: nn.Module) -> list[list[str]]:
    """Names of parameters and persistent buffers, grouped by shared tensor (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, param in lm.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for name, buffer in lm.named_buffers(remove_duplicate=False):
        owner, _, short = name.rpartition(".")
        module = lm.get_submodule(owner) if owner else lm
        if short not in module._non_persistent_buffers_set:
            groups.setdefault(id(buffer), []).append(name)
    return list(groups.values())


def _assign(lm: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, short = name.rpartition(".")
    module = lm.get_submodule(owner) if owner else lm
    if short in module._parameters:
        if isinstance(tensor, nn.Parameter):
            module._parameters[short] = tensor
        else:
            module._parameters[short] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    else:
        module._buffers[short] = tensor


def fill_tensors(lm: nn.Module, arch: Architecture, selection: Selection, take) -> None:
    """Fill the skeleton ``lm`` tensor by tensor: ``take(Take) -> Tensor``."""
    groups = tensor_groups(lm)
    plan = tensor_plan(arch, selection, [name for group in groups for name in group])
    for group in groups:
        expected = tuple(lm.get_parameter(group[0]).shape) if is_parameter(lm, group[0]) \
            else tuple(lm.get_buffer(group[0]).shape)
        tensor = take(plan[group[0]])
        if tuple(tensor.shape) != expected:
            raise FileFormatError(
                f"{plan[group[0]].source} gives a tensor of shape {tuple(tensor.shape)} for {group[0]}, "
                f"which needs {expected}"
            )
        if is_parameter(lm, group[0]):
            tensor = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        for name in group:
            _assign(lm, name, tensor)


def is_parameter(lm: nn.Module, name: str) -> bool:
    """Whether ``name`` (a dotted state-dict name) is a parameter of ``lm`` rather than a buffer."""
    owner, _, short = name.rpartition(".")
    return short in (lm.get_submodule(owner) if owner else lm)._parameters


def materialise_buffers(lm: nn.Module, device, reference: nn.Module | None = None) -> None:
    """Give the non-persistent buffers still on ``meta`` (rotary frequencies) their values:
    copied from ``reference`` when it has them, else recomputed by transformers' init
    (only for modules without parameters, whose init cannot touch a loaded weight)."""
    ref_buffers = dict(reference.named_buffers()) if reference is not None else {}
    owners: dict[str, nn.Module] = {}
    for name, buffer in list(lm.named_buffers()):
        if not buffer.is_meta:
            continue
        if name in ref_buffers and ref_buffers[name].shape == buffer.shape:
            _assign(lm, name, ref_buffers[name].detach().clone())
            continue
        owner = name.rpartition(".")[0]
        module = lm.get_submodule(owner) if owner else lm
        if any(True for _ in module.parameters(recurse=False)):
            raise FileFormatError(f"cannot recompute buffer {name}: its module holds parameters")
        _assign(lm, name, torch.empty_like(buffer, device=device))
        owners[owner] = module
    for module in owners.values():
        lm._init_weights(module)
    left = [name for name, t in list(lm.named_parameters()) + list(lm.named_buffers()) if t.is_meta]
    if left:
        raise FileFormatError(f"the sub-network was left without values for {left[:5]}")


def finish_subnetwork(lm: nn.Module, device) -> nn.Module:
    """Give a filled sub-network its remaining buffers (:func:`materialise_buffers`) and eval mode."""
    materialise_buffers(lm, device)
    return lm.eval()


# -- the builder ------------------------------------------------------------------------------
def take_rows(tensor: torch.Tensor, take: Take) -> torch.Tensor:
    """The part of a full tensor that ``take`` keeps (a copy: the whole tensor when ``take.dim`` is None)."""
    if take.dim is None:
        return tensor.detach().clone()
    index = torch.cat([torch.arange(a, b) for a, b in take.ranges]) if take.ranges else torch.zeros(0, dtype=torch.long)
    return tensor.detach().index_select(take.dim, index.to(tensor.device)).contiguous()


def _check_masks_fit(lm: nn.Module, arch: Architecture) -> None:
    actual = describe(lm, mlp_group=arch.mlp_group)
    if actual.to_dict() != arch.to_dict():
        different = sorted(k for k, v in actual.to_dict().items() if arch.to_dict().get(k) != v)
        raise ValueError(f"the masks were made for another model (its architecture differs in {different})")


class TensorSource(Protocol):
    """Where :func:`build_from_source` reads a sub-network's tensors from: a full LM's
    tensors, by name.

    ``take(cut)`` returns the full LM's tensor ``cut.source`` whole (``cut.dim`` is None)
    or cut to the concatenation of ``cut.ranges`` along ``cut.dim``
    (:class:`Take`). ``config`` is the full LM's config; ``device`` where buffers that
    must be recomputed go; ``attn_implementation`` the attention the skeleton is built
    with (None: transformers' default); ``reference`` a module whose non-persistent
    buffers (rotary frequencies) are copied, or None to recompute them;
    ``generation_config()`` the sub-network's generation config, or None.
    ``shares_storage`` says that what ``take`` returns may be the LM's own storage: the
    builder then changes no value in place and freezes the parameters.
    """

    config: object
    device: torch.device
    attn_implementation: str | None
    reference: nn.Module | None
    shares_storage: bool

    def take(self, cut: Take) -> torch.Tensor:
        """The full LM's tensor ``cut.source``, whole or cut as ``cut`` says."""
        ...

    def has(self, name: str) -> bool:
        """Whether the full LM holds a tensor ``name``."""
        ...

    def generation_config(self):
        """The sub-network's generation config, or None."""
        ...


class LMTensors:
    """The tensors of an LM in memory; every cut is a copy (the LM is left untouched)."""

    shares_storage = False

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.config = lm.config
        self.attn_implementation = getattr(lm.config, "_attn_implementation", None)
        self.device = next(lm.parameters()).device
        self.reference = lm
        self.tensors = dict(lm.named_parameters(remove_duplicate=False))
        self.tensors.update(lm.named_buffers(remove_duplicate=False))

    def full(self, cut: Take) -> torch.Tensor:
        """The whole tensor ``cut.source`` (the LM's own storage, detached)."""
        if cut.source not in self.tensors:
            raise ValueError(f"the LM has no tensor {cut.source}")
        return self.tensors[cut.source].detach()

    def take(self, cut: Take) -> torch.Tensor:
        """A copy of what ``cut`` keeps."""
        return take_rows(self.full(cut), cut)

    def has(self, name: str) -> bool:
        """Whether the LM holds a tensor ``name``."""
        return name in self.tensors

    def generation_config(self):
        """A copy of the LM's generation config (None if it has none)."""
        generation = getattr(self.lm, "generation_config", None)
        return copy.deepcopy(generation) if generation is not None else None


class SharedTensors(LMTensors):
    """The tensors of an LM in memory as views: a whole tensor is the LM's own, a cut that
    is a prefix along its dimension (rows: ``weight[:rows]``, contiguous; columns:
    ``weight[:, :cols]``, a strided view) shares the LM's storage; any other cut is copied.
    In a rank-sorted LM every kept unit is a prefix (GPT-2's fused q/k/v excepted)."""

    shares_storage = True

    def take(self, cut: Take) -> torch.Tensor:
        """A view of what ``cut`` keeps where it is a prefix, else a copy."""
        tensor = self.full(cut)
        if cut.dim is None:
            return tensor
        if len(cut.ranges) == 1 and cut.ranges[0][0] == 0:
            return tensor.narrow(cut.dim, 0, cut.ranges[0][1])
        return take_rows(tensor, cut)


def idle_layers(source: TensorSource, arch: Architecture, selection: Selection) -> tuple[int, ...]:
    """Positions in ``selection`` of the kept layers that add nothing to the residual stream:
    no attention unit, no MLP unit, and no bias on the attention and MLP output projections
    (``source`` holds none), so that both output zeros and the layer passes its input on
    unchanged, as the masked LM computes it. A family whose output projections carry biases
    (GPT-2) adds them in such a layer, which therefore is not idle. The first layer is left
    out of the answer when every kept layer is idle: a sub-network keeps at least one."""
    family = FAMILIES[arch.family]

    def biased(layer: int, path: str) -> bool:
        return source.has(f"{family.layers}.{layer}.{path}.bias")

    idle = tuple(j for j, (layer, attention, mlp) in enumerate(zip(selection.layers, selection.attention,
                                                                   selection.mlp))
                 if not attention and not mlp and not biased(layer, family.o) and not biased(layer, family.mlp_out))
    return idle if len(idle) < len(selection.layers) else idle[1:]


def build_from_source(source: TensorSource, arch: Architecture, selection: Selection) -> nn.Module:
    """The sub-network holding ``selection`` of the LM described by ``arch``, its tensors
    taken from ``source`` (a new module in eval mode; the source is not modified).

    The kept layers that are idle (:func:`idle_layers`: no unit, no output bias) are left
    out: the logits are the same without them, and every token decodes through fewer
    layers. Its decoder then holds the masks' ``kept_params`` less those layers' own
    parameters (their norms), and ``config.ppn_widths.source_layers`` lists the layers it holds.

    Raises ``ValueError`` when ``source`` shares storage and the family rescales the kept
    layers' weights (GPT-2's ``scale_attn_by_inverse_layer_idx``), and
    :class:`~ppn_bayes.io.FileFormatError` when a tensor the source gives has the wrong shape.
    """
    family = FAMILIES[arch.family]
    if source.shares_storage and family.scales_attention_by_layer(source.config):
        raise ValueError(f"a {family.name} LM with {family.layer_scale_flag} rescales its kept layers' weights: "
                         "use build_subnetwork (a copy) for its drafts")
    selection = selection.without(idle_layers(source, arch, selection))
    widths = selection.widths(arch)
    config = subnetwork_config(source.config, family, widths)
    sub = empty_subnetwork(config, family, widths, source.attn_implementation)
    fill_tensors(sub, arch, selection, source.take)
    fold_layer_scale(sub, family, widths)
    materialise_buffers(sub, source.device, reference=source.reference)
    generation = source.generation_config()
    if generation is not None:
        sub.generation_config = generation
    if source.shares_storage:
        for parameter in sub.parameters():
            parameter.requires_grad_(False)
    return sub.eval()


def build_subnetwork(lm: nn.Module, masks) -> nn.Module:
    """A dense sub-network of ``lm`` keeping what ``masks`` keep.

    Parameters
    ----------
    lm:
        A Hugging Face causal LM of a supported family; it is not modified.
    masks:
        :class:`~ppn_bayes.core.ranking.Masks` made for ``lm`` (``masks.arch`` must equal
        ``describe(lm, mlp_group=masks.arch.mlp_group)``).

    Returns
    -------
    torch.nn.Module
        A new LM of the same class, in eval mode, with the dropped layers, attention
        units and MLP units removed, and the kept layers left with no unit and no output
        bias (:func:`idle_layers`) as well; its logits equal those of the masked-dense
        reference ``GatedLM(lm, masks.arch)(x, gates=masks.gates())``. Its decoder layers
        hold ``masks.kept_params`` parameters less the idle layers' own (their norms);
        per-layer widths are in ``sub.config.ppn_widths`` (see :func:`subnetwork_widths`).

    Raises
    ------
    ValueError
        The masks are for another model, keep a unit of a dropped layer, or keep no layer.
    """
    _check_masks_fit(lm, masks.arch)
    return build_from_source(LMTensors(lm), masks.arch, selection_from_masks(masks))


def subnetwork_widths(sub: nn.Module) -> Widths:
    """The per-layer :class:`Widths` recorded in a sub-network's config."""
    data = getattr(sub.config, "ppn_widths", None)
    if data is None:
        raise ValueError("this LM is not a ppn_bayes sub-network (its config has no ppn_widths)")
    return Widths.from_dict(data)


def held_params(sub: nn.Module, masks) -> int:
    """The decoder parameters of ``sub``, a sub-network built from ``masks``, checked against
    them: the masks' ``kept_params`` less the own parameters (norms) of the kept layers it
    left out, each of which must keep no unit (:func:`idle_layers`). ``RuntimeError`` naming
    the difference otherwise (a builder that cut the wrong rows, or a sub-network of other
    masks)."""
    arch = masks.arch
    held = set(subnetwork_widths(sub).source_layers)
    left_out = [l for l in torch.as_tensor(masks.layer).nonzero().flatten().tolist() if l not in held]
    busy = [l for l in left_out if bool(torch.as_tensor(masks.unit)[l].any())]
    if busy:
        raise RuntimeError(f"the sub-network leaves out layers {busy}, which keep units")
    expected = masks.kept_params - sum(arch.layer_cost[l] for l in left_out)
    params = decoder_params(sub)
    if params != expected:
        raise RuntimeError(f"the sub-network holds {params} decoder parameters, its masks {expected} "
                           f"({masks.kept_params} less the norms of the {len(left_out)} idle layers left out)")
    return params


def decoder_params(lm: nn.Module) -> int:
    """Parameters in ``lm``'s decoder layers (what a size counts)."""
    return sum(p.numel() for p in decoder_layers(lm).parameters())


# -- saving and loading -----------------------------------------------------------------------
def save_subnetwork(sub: nn.Module, tokenizer, out: str | Path, *, overwrite: bool = False,
                    extra_json: dict[str, dict] | None = None) -> Path:
    """Save a sub-network (safetensors and JSON) and its tokenizer to ``out``, atomically;
    ``extra_json`` maps file names to JSON data written into the same directory.

    An existing ``out`` is refused unless ``overwrite``. When every layer keeps the same
    widths (and the family's config can express them) the directory loads with plain
    ``AutoModelForCausalLM.from_pretrained(out)``; in every case it loads with
    :func:`load_subnetwork`.
    """
    subnetwork_widths(sub)  # refuse anything that is not a sub-network
    with atomic_directory(out, overwrite=overwrite) as tmp:
        sub.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (extra_json or {}).items():
            (Path(tmp) / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise FileFormatError(f"{index} is not a safetensors index ({err!r})") from None
        return sorted({directory / name for name in weight_map.values()})
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileFormatError(f"{directory} holds no model.safetensors")
    return [single]


def load_subnetwork(directory: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Load a sub-network saved by :func:`save_subnetwork` (any per-layer widths).

    The config's ``ppn_widths`` say how wide each layer is: the modules are built on the
    meta device at those widths and filled from the safetensors file(s), so nothing
    larger than the sub-network is ever allocated. A directory without ``ppn_widths``
    (a plain Hugging Face directory) is loaded with ``from_pretrained``. Raises
    :class:`~ppn_bayes.io.FileFormatError` when a tensor is missing, extra or of the
    wrong shape.
    """
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileFormatError(f"{directory} holds no config.json: not a saved sub-network")
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise FileFormatError(f"{directory}/config.json does not load ({err})") from None
    if getattr(config, "ppn_widths", None) is None:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return AutoModelForCausalLM.from_pretrained(str(directory), **kwargs).to(device).eval()
    try:
        widths = Widths.from_dict(config.ppn_widths)
    except ValueError as err:
        raise FileFormatError(f"{directory}/config.json: {err}") from None
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise FileFormatError(f"{directory}: model_type {config.model_type!r} is not supported")
    sub = empty_subnetwork(config, family, widths)
    expected = {name: group for group in tensor_groups(sub) for name in group}
    seen: set[str] = set()
    try:
        for file in _safetensors_files(directory):
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                for name in handle.keys():
                    if name not in expected:
                        raise FileFormatError(f"{file.name} holds {name}, which this sub-network does not have")
                    tensor = handle.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    group = expected[name]
                    want = tuple((sub.get_parameter(name) if is_parameter(sub, name) else sub.get_buffer(name)).shape)
                    if tuple(tensor.shape) != want:
                        raise FileFormatError(f"{name} has shape {tuple(tensor.shape)}, ppn_widths say {want}")
                    if is_parameter(sub, name):
                        tensor = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
                    for alias in group:
                        _assign(sub, alias, tensor)
                    seen.update(group)
    except SafetensorError as err:
        raise FileFormatError(f"{directory}: a safetensors file is corrupt ({err})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise FileFormatError(f"{directory} lacks tensors {missing[:5]}")
    generation = directory / "generation_config.json"
    if generation.is_file():
        from transformers import GenerationConfig

        sub.generation_config = GenerationConfig.from_pretrained(str(directory))
    return finish_subnetwork(sub, device)
