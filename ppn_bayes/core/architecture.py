"""What can be pruned in an LM, read from the LM itself.

A decoder-only LM has ``L`` layers. Each layer owns its norms (and any parameter no unit
owns) and holds two kinds of prunable units:

* attention units: one key/value group with the query heads that read it (grouped-query
  attention), or one head when every head has its own key/value (``A`` units a layer);
* MLP units: groups of ``g`` intermediate channels (``M`` units a layer).

The unit axis of every per-unit tensor is ``[attention units..., MLP units...]``, so a
layer has ``U = A + M`` units. Costs are parameter counts: all the weights a unit owns.

What differs between model families (where the layers are, what the projections are
called, whether q/k/v are fused) lives in :data:`FAMILIES`, one entry a family. Nothing is
guessed from a model's name: the facts come from its modules and config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import torch
from torch import nn

__all__ = ["Family", "FAMILIES", "Architecture", "architecture_from_record", "describe", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The LM's layout is not one ppn_bayes knows how to gate."""


@dataclass(frozen=True)
class Family:
    """Where one model family keeps what ppn_bayes gates.

    Paths are attribute paths relative to the LM (``layers``) or to one decoder layer.
    ``fused_qkv`` marks GPT-2's single ``c_attn`` Conv1D holding q, k and v side by side.
    Everything that differs between families (weight layout, where q, k and v rows live,
    the config fields and attributes that count heads, a per-layer attention scale) is
    answered by the methods below, so that other modules ask the family instead of
    testing for a model type.
    """

    name: str
    layers: str  # ModuleList of decoder layers, from the LM
    final_norm: str  # from the LM; kept with the embeddings, outside the size
    q: str
    k: str
    v: str
    o: str  # attention output projection: input columns are head outputs
    mlp_in: tuple[str, ...]  # projections whose output rows are MLP channels
    mlp_out: str  # projection whose input columns are MLP channels
    fused_qkv: bool = False
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D) instead of [out, in]
    #: a config flag that, when true, scales layer ``l``'s attention logits by ``1/(l + 1)``
    layer_scale_flag: str | None = None

    @property
    def weight_dims(self) -> tuple[int, int]:
        """``(output dim, input dim)`` of a projection's weight: ``(0, 1)`` for a Linear's
        ``[out, in]``, ``(1, 0)`` for GPT-2's Conv1D ``[in, out]``."""
        return (1, 0) if self.conv1d else (0, 1)

    def out_features(self, weight: torch.Tensor) -> int:
        """How many outputs a projection of this family with ``weight`` has."""
        return weight.shape[self.weight_dims[0]]

    def in_features(self, weight: torch.Tensor) -> int:
        """How many inputs a projection of this family with ``weight`` has."""
        return weight.shape[self.weight_dims[1]]

    def out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as ``[out, in]`` (a view)."""
        return weight.t() if self.conv1d else weight

    def qkv_rows(self, *, n_heads: int, head_dim: int, heads_per_unit: int) -> tuple[tuple[str, int, int], ...]:
        """Where an attention unit's query, key and value rows live: ``(projection path,
        offset of the block, rows per unit)`` for q, k and v in turn.

        Unit ``u`` owns rows ``offset + u·rows ... offset + (u+1)·rows`` of the path's
        outputs. Separate projections start at 0; GPT-2's fused ``c_attn`` holds q, k and v
        side by side, ``n_heads · head_dim`` outputs each.
        """
        q_rows = heads_per_unit * head_dim
        if self.fused_qkv:
            width = n_heads * head_dim
            return (self.q, 0, q_rows), (self.q, width, head_dim), (self.q, 2 * width, head_dim)
        return (self.q, 0, q_rows), (self.k, 0, head_dim), (self.v, 0, head_dim)

    def qkv_outputs(self, *, units: int, heads_per_unit: int, head_dim: int, n_heads: int) -> dict[str, int]:
        """``{projection path: outputs}`` of q, k and v with ``units`` attention units kept
        (``n_heads`` is the full LM's, for the fused layout)."""
        outputs: dict[str, int] = {}
        for path, _, rows in self.qkv_rows(n_heads=n_heads, head_dim=head_dim, heads_per_unit=heads_per_unit):
            outputs[path] = outputs.get(path, 0) + units * rows
        return outputs

    def attention_fields(self, *, heads: int, head_dim: int) -> dict[str, int]:
        """Attributes of the attention module that count its heads and must follow a cut:
        GPT-2 splits ``c_attn``'s output by ``split_size`` and reshapes by ``num_heads``;
        the Llama-style attention reshapes with ``-1`` heads and needs nothing."""
        if self.fused_qkv:
            return {"split_size": heads * head_dim, "num_heads": heads}
        return {}

    def uniform_config_fields(self, config, *, heads: int, kv_heads: int, intermediate: int,
                              head_dim: int) -> dict | None:
        """Config fields that say a cut every layer shares, or ``None`` when this family's
        config cannot say it (GPT-2 derives ``head_dim = n_embd / n_head``, so it can only
        say "all heads")."""
        if self.fused_qkv:
            return {"n_inner": intermediate} if heads == config.n_head else None
        return {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": intermediate,
                "head_dim": head_dim}

    def scales_attention_by_layer(self, config) -> bool:
        """Whether ``config`` scales layer ``l``'s attention logits by ``1/(l + 1)``: a kept
        layer that changes index then needs its queries rescaled."""
        return self.layer_scale_flag is not None and bool(getattr(config, self.layer_scale_flag, False))


_LLAMA = dict(
    layers="model.layers",
    final_norm="model.norm",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
)

#: One entry a supported ``config.model_type``.
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", **_LLAMA),
    "mistral": Family("mistral", **_LLAMA),
    "qwen2": Family("qwen2", **_LLAMA),
    "qwen3": Family("qwen3", **_LLAMA),
    "gpt2": Family(
        "gpt2",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        q="attn.c_attn",
        k="attn.c_attn",
        v="attn.c_attn",
        o="attn.c_proj",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        fused_qkv=True,
        conv1d=True,
        layer_scale_flag="scale_attn_by_inverse_layer_idx",
    ),
}


def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c`` for ``path='a.b.c'``, with an error that names the missing part."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise UnsupportedModelError(
                f"{type(root).__name__} has no module '{path}' (missing '{part}')"
            )
        module = getattr(module, part)
    return module


@dataclass(frozen=True)
class Architecture:
    """The prunable structure of one LM, and the parameter cost of every part.

    Shapes: ``layer_cost [L]``, ``unit_cost [L, U]`` with ``U = n_attention_units +
    n_mlp_units``. ``total_cost`` is ``C`` of the budget equation: every parameter in the
    decoder layers. Embeddings, the LM head and the final norm are ``outside_cost``.
    """

    family: str
    model_type: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    mlp_group: int
    n_attention_units: int
    n_mlp_units: int
    layer_cost: tuple[int, ...]
    unit_cost: tuple[tuple[int, ...], ...]
    outside_cost: int

    @property
    def n_units(self) -> int:
        return self.n_attention_units + self.n_mlp_units

    @property
    def heads_per_unit(self) -> int:
        return self.n_heads // self.n_attention_units

    @property
    def total_cost(self) -> int:
        return sum(self.layer_cost) + sum(map(sum, self.unit_cost))

    def costs(self, device=None, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """``(layer_cost [L], unit_cost [L, U])`` as tensors."""
        return (
            torch.tensor(self.layer_cost, dtype=dtype, device=device),
            torch.tensor(self.unit_cost, dtype=dtype, device=device),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Architecture":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"architecture record lacks {sorted(missing)}")
        data = {k: data[k] for k in names}
        data["layer_cost"] = tuple(int(c) for c in data["layer_cost"])
        data["unit_cost"] = tuple(tuple(int(c) for c in row) for row in data["unit_cost"])
        return cls(**data)


def family_of(lm: nn.Module) -> Family:
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(lm).__name__} has no config.model_type: pass a Hugging Face causal LM"
        )
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported; supported: {sorted(FAMILIES)}. "
            "Add an entry to ppn_bayes.core.architecture.FAMILIES for its layout."
        )
    return FAMILIES[model_type]


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    layers = get_module(lm, family_of(lm).layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(f"{type(lm).__name__} has no decoder layers")
    return layers


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(lm: nn.Module, *, mlp_group: int = 64) -> Architecture:
    """Read the prunable units of ``lm`` and their costs from its modules.

    ``mlp_group`` is ``g``, the number of intermediate channels in one MLP unit; it must
    divide every layer's intermediate size. Raises :class:`UnsupportedModelError` naming
    what is missing when the layout is unknown.
    """
    family = family_of(lm)
    config = lm.config
    layers = decoder_layers(lm)
    hidden = config.hidden_size
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    if n_heads % n_kv:
        raise UnsupportedModelError(f"{n_heads} query heads do not split into {n_kv} groups")
    first = layers[0]
    mlp_out = get_module(first, family.mlp_out)
    inter = family.in_features(mlp_out.weight)
    if mlp_group < 1 or inter % mlp_group:
        raise ValueError(
            f"mlp_group={mlp_group} must divide the intermediate size {inter}"
        )
    n_mlp = inter // mlp_group
    heads_per_unit = n_heads // n_kv

    layer_cost, unit_cost = [], []
    for index, layer in enumerate(layers):
        # Attention: a unit owns q rows of its heads, k/v rows of its group, o columns.
        get_module(layer, family.o)  # o_proj must exist: its columns are the units'
        rows = family.qkv_rows(n_heads=n_heads, head_dim=head_dim, heads_per_unit=heads_per_unit)
        widths = family.qkv_outputs(units=n_kv, heads_per_unit=heads_per_unit, head_dim=head_dim, n_heads=n_heads)
        for path, width in widths.items():
            proj = get_module(layer, path)
            if family.out_features(proj.weight) != width:
                raise UnsupportedModelError(
                    f"layer {index}: {path} has {family.out_features(proj.weight)} outputs, expected {width}"
                )
        attn_unit = sum(hidden * r + (r if get_module(layer, path).bias is not None else 0) for path, _, r in rows)
        attn_unit += hidden * heads_per_unit * head_dim  # o columns
        # MLP: a unit owns g rows of every input projection and g columns of the output.
        mlp_unit = 0
        for path in family.mlp_in:
            proj = get_module(layer, path)
            if family.out_features(proj.weight) != inter:
                raise UnsupportedModelError(f"layer {index}: {path} is not {inter} wide")
            mlp_unit += mlp_group * hidden + (mlp_group if proj.bias is not None else 0)
        mlp_unit += mlp_group * hidden
        units = [attn_unit] * n_kv + [mlp_unit] * n_mlp
        rest = _n_params(layer) - sum(units)
        if rest < 0:
            raise UnsupportedModelError(f"layer {index}: unit costs exceed its parameters")
        layer_cost.append(rest)
        unit_cost.append(tuple(units))

    outside = _n_params(lm) - sum(layer_cost) - sum(map(sum, unit_cost))
    return Architecture(
        family=family.name,
        model_type=config.model_type,
        n_layers=len(layers),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=inter,
        mlp_group=mlp_group,
        n_attention_units=n_kv,
        n_mlp_units=n_mlp,
        layer_cost=tuple(layer_cost),
        unit_cost=tuple(unit_cost),
        outside_cost=outside,
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def architecture_from_record(data) -> Architecture:
    """The :class:`Architecture` a file records (its ``to_dict`` read back from JSON), with every
    field checked: a ``ValueError`` names the first one that is missing or inconsistent."""
    if not isinstance(data, dict):
        raise ValueError("'architecture' must be an object")
    ints = ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "intermediate_size", "mlp_group",
            "n_attention_units", "n_mlp_units", "outside_cost")
    for key in ints:
        if not _is_int(data.get(key)) or data[key] < (0 if key == "outside_cost" else 1):
            raise ValueError(f"architecture.{key} must be a positive integer, got {data.get(key)!r}")
    if data.get("family") not in FAMILIES or not isinstance(data.get("model_type"), str):
        raise ValueError(f"architecture.family {data.get('family')!r} is not a supported family")
    L, A, M = data["n_layers"], data["n_attention_units"], data["n_mlp_units"]
    layer_cost, unit_cost = data.get("layer_cost"), data.get("unit_cost")
    if not isinstance(layer_cost, list) or len(layer_cost) != L or not all(_is_int(c) and c >= 0 for c in layer_cost):
        raise ValueError(f"architecture.layer_cost must list {L} non-negative integers")
    if not isinstance(unit_cost, list) or len(unit_cost) != L or not all(
            isinstance(row, list) and len(row) == A + M and all(_is_int(c) and c > 0 for c in row)
            for row in unit_cost):
        raise ValueError(f"architecture.unit_cost must be {L} rows of {A + M} positive integers")
    if A != data["n_kv_heads"] or data["n_heads"] % A or M * data["mlp_group"] != data["intermediate_size"]:
        raise ValueError("architecture: unit counts do not agree with heads and the intermediate size")
    return Architecture.from_dict(data)
