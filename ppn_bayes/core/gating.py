"""Gates on a Hugging Face LM, by hooks: the LM is wrapped, never forked.

For layer ``l`` with layer gate ``z_l`` and unit gates ``z_lu``:

* an attention unit's output (its heads, before ``o_proj``) is multiplied by ``z_lu``;
* an MLP unit's activation (its channels, before ``down_proj``) is multiplied by ``z_lu``;
* the layer's two residual updates (the outputs of ``o_proj`` and ``down_proj``) are
  multiplied by ``z_l``, so ``z_l = 0`` makes the layer an exact identity.

Multiplying by exactly 1.0 changes no bit, so all gates at one reproduce the LM's logits
exactly. :meth:`GatedLM.unload` removes every hook and returns the untouched LM.

With :class:`~ppn_bayes.core.adapters.SizeAdapters` (``adapters=``) and per-row size weights
``w [B, K]`` given with the gates, each of the two output projections also adds its size
correction ``Σ_k w_k · (x A_kᵀ) B_kᵀ`` (``x`` its input after the unit gates) before the layer
gate multiplies the output. Without size weights (a teacher pass) nothing is added.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import SizeAdapters
from .architecture import Architecture, decoder_layers, describe, family_of, get_module

__all__ = ["Gates", "GatedLM"]


@dataclass(frozen=True)
class Gates:
    """Soft (or hard) gates for one forward pass.

    ``layer [*B, L]`` and ``unit [*B, L, U]``; the optional leading batch dimension ``B``
    gives every sequence of the batch its own gates.
    """

    layer: torch.Tensor
    unit: torch.Tensor

    @classmethod
    def ones(cls, arch: Architecture, device=None, dtype=torch.float32) -> "Gates":
        return cls(
            torch.ones(arch.n_layers, device=device, dtype=dtype),
            torch.ones(arch.n_layers, arch.n_units, device=device, dtype=dtype),
        )


class GatedLM(nn.Module):
    """An LM whose layers and units are multiplied by :class:`Gates`.

    ``gated(input_ids, gates=g)`` runs the LM under ``g``; ``gates=None`` runs it
    untouched. The hooks read the gates of the call in flight, so the same module serves
    the teacher (no gates) and the gated student.
    """

    def __init__(self, lm: nn.Module, arch: Architecture | None = None, *, mlp_group: int = 64,
                 adapters: SizeAdapters | None = None):
        super().__init__()
        self.lm = lm
        self.arch = arch if arch is not None else describe(lm, mlp_group=mlp_group)
        #: the size adapters (:mod:`ppn_bayes.core.adapters`), or ``None``
        self.adapters = adapters
        self._gates: Gates | None = None
        self._size_weights: torch.Tensor | None = None
        self._compiled_hidden = None
        self._handles: list = []
        family = family_of(lm)
        A = self.arch.n_attention_units
        head_width = self.arch.heads_per_unit * self.arch.head_dim
        for index, layer in enumerate(decoder_layers(lm)):
            o = get_module(layer, family.o)
            down = get_module(layer, family.mlp_out)
            self._handles += [
                o.register_forward_pre_hook(self._unit_hook(index, slice(0, A), head_width)),
                o.register_forward_hook(self._layer_hook(index, "o")),
                down.register_forward_pre_hook(
                    self._unit_hook(index, slice(A, None), self.arch.mlp_group)
                ),
                down.register_forward_hook(self._layer_hook(index, "mlp_out")),
            ]

    # -- hooks -----------------------------------------------------------------------
    def _unit_hook(self, index: int, units: slice, width: int):
        def hook(module, args):
            if self._gates is None:
                return None
            (x, *rest) = args  # x: [B, T, n_units * width]
            gate = self._gates.unit[..., index, units]  # [*B, n_units]
            gate = gate.repeat_interleave(width, dim=-1).to(x.dtype)  # [*B, n_units * width]
            if gate.dim() == 2:
                gate = gate[:, None, :]  # [B, 1, D]
            return (x * gate, *rest)

        return hook

    def _layer_hook(self, index: int, projection: str):
        def hook(module, args, output):
            if self._gates is None:
                return None
            if self._size_weights is not None:  # args: the input as the unit hook left it
                output = output + self.adapters.delta(index, projection, args[0], self._size_weights).to(output.dtype)
            gate = self._gates.layer[..., index].to(output.dtype)  # [*B]
            if gate.dim() == 1:
                gate = gate[:, None, None]  # [B, 1, 1]
            return output * gate

        return hook

    # -- use -------------------------------------------------------------------------
    def _check(self, gates: Gates) -> None:
        """Refuse gates whose last dimensions are not ``L`` layers and ``[L, U]`` units."""
        L, U = self.arch.n_layers, self.arch.n_units
        if gates.layer.shape[-1] != L or gates.unit.shape[-2:] != (L, U):
            raise ValueError(
                f"gates of shape layer {tuple(gates.layer.shape)}, unit "
                f"{tuple(gates.unit.shape)} do not fit {L} layers x {U} units"
            )

    def _check_size_weights(self, gates: Gates | None, size_weights: torch.Tensor | None) -> None:
        """Refuse size weights without adapters or gates, or of the wrong number of anchors."""
        if size_weights is None:
            return
        if self.adapters is None:
            raise ValueError("size weights were given, but this gated LM has no size adapters")
        if gates is None:
            raise ValueError("size weights apply with gates only (a pass without gates is the untouched LM)")
        if size_weights.shape[-1] != self.adapters.n_anchors or size_weights.dim() > 2:
            raise ValueError(f"size weights of shape {tuple(size_weights.shape)} do not fit "
                             f"{self.adapters.n_anchors} anchors ([K] or [B, K])")

    def size_weights(self, sizes) -> torch.Tensor:
        """The adapters' interpolation weights ``[..., K]`` of ``sizes`` (a number or a tensor
        ``[...]``), in the adapters' dtype."""
        if self.adapters is None:
            raise ValueError("this gated LM has no size adapters")
        return self.adapters.weights(sizes).to(self.adapters.anchors.device, next(self.adapters.parameters()).dtype)

    @contextlib.contextmanager
    def gates_applied(self, gates: Gates | None, size_weights: torch.Tensor | None = None):
        """Run the LM under ``gates`` (and the size adapters under ``size_weights``, ``[K]`` or
        per row ``[B, K]``) inside the ``with`` block."""
        if gates is not None:
            self._check(gates)
        self._check_size_weights(gates, size_weights)
        previous = self._gates, self._size_weights
        self._gates, self._size_weights = gates, size_weights
        try:
            yield self
        finally:
            self._gates, self._size_weights = previous

    # -- the decoder's final hidden states, for the fit's objective ----------------------
    @property
    def base(self) -> nn.Module:
        """The LM without its head (``lm.model`` for Llama, ``lm.transformer`` for GPT-2)."""
        return getattr(self.lm, self.lm.base_model_prefix)

    @property
    def head(self) -> torch.Tensor:
        """The LM head's weight ``[V, d]``: logits are ``hidden · headᵀ``."""
        return self.lm.get_output_embeddings().weight

    def _gated_hidden(self, input_ids: torch.Tensor, layer: torch.Tensor, unit: torch.Tensor,
                      size_weights: torch.Tensor | None = None) -> torch.Tensor:
        # The gates (and the size weights) are plain tensor arguments, so one compiled graph
        # serves every step and size; the hooks read them from the module while the call runs.
        self._gates, self._size_weights = Gates(layer, unit), size_weights
        try:
            return self.base(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, d]
        finally:
            self._gates, self._size_weights = None, None

    def compile(self, **options) -> None:
        """Compile :meth:`hidden` (``torch.compile(..., dynamic=False, **options)``): one graph
        for every gate value of a batch shape."""
        self._compiled_hidden = torch.compile(self._gated_hidden, dynamic=False, **options)

    def hidden(self, input_ids: torch.Tensor, gates: Gates, size_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``[B, T, d]`` of the LM under ``gates`` (per-row gates ``layer
        [B, L]``, ``unit [B, L, U]``, or shared ``[L]``, ``[L, U]``) and, with size adapters, the
        per-row size weights ``[B, K]`` (``None``: no adapter is applied); compiled after
        :meth:`compile`."""
        self._check(gates)
        self._check_size_weights(gates, size_weights)
        run = self._compiled_hidden or self._gated_hidden
        if size_weights is None:  # the graph of a fit without adapters, as before
            return run(input_ids, gates.layer, gates.unit)
        return run(input_ids, gates.layer, gates.unit, size_weights)

    def forward(self, input_ids: torch.Tensor, gates: Gates | None = None, size_weights: torch.Tensor | None = None,
                **kwargs):
        """Logits ``[B, T, V]`` of the LM under ``gates`` and the size adapters' ``size_weights``
        (``[K]`` or ``[B, K]``; see :meth:`size_weights`) (no KV cache: only the logits come back)."""
        kwargs.setdefault("use_cache", False)
        with self.gates_applied(gates, size_weights):
            return self.lm(input_ids=input_ids, **kwargs).logits

    def unload(self) -> nn.Module:
        """Remove every hook and return the original LM."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.lm
