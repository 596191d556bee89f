"""The per-token training objective of a fit, computed without ``[B, T, V]`` tensors.

Every row ``r`` of a batch is scored by the mean over its positions ``t < T - 1`` of

    ℓ_rt = w_nll · (-log p_s(x_{t+1} | x_≤t))  +  w_kl · KL(p_t(· | x_≤t) ‖ p_s(· | x_≤t))

where ``p_s`` is the (gated) student's next-token distribution and ``p_t`` the teacher's.
Both come from final hidden states and an LM head: ``logits = h · Wᵀ``. A vocabulary of
49k tokens makes the logits of a 16 × 2048 batch 6.4 GB in float32 per tensor, so
:func:`fused_objective` never builds them whole: it walks the rows in chunks, computes a
chunk's logits, its loss and the loss's gradient with respect to the chunk's logits at
once (``w_nll · (softmax(s) − onehot(x)) + w_kl · (softmax(s) − p_t)``, scaled by the
row's weight and ``1 / (T − 1)``), and keeps only the gradients of the hidden states and
of the head: ``∂h = ∂s · W`` and ``∂W = ∂sᵀ · h``. The backward pass only scales them.

:func:`plain_objective` is the slow, obvious reference (whole logits, autograd);
``tests/test_objective.py`` compares the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Teacher", "fused_objective", "plain_objective", "RowLosses", "distillation_kl"]


@dataclass(frozen=True)
class Teacher:
    """What the teacher hands the student: its final hidden states ``hidden [B, T, d]`` and
    its LM head ``head [V, d]`` (logits ``hidden · headᵀ``), or whole ``logits [B, T, V]``."""

    hidden: torch.Tensor | None = None
    head: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def __post_init__(self):
        if (self.logits is None) == (self.hidden is None or self.head is None):
            raise ValueError("a Teacher holds either logits or hidden states with their head")

    def chunk_logits(self, rows: slice) -> torch.Tensor:
        """The teacher's logits ``[n, V]`` of the flattened rows ``rows`` (positions of ``[B·T]``)."""
        if self.logits is not None:
            return self.logits.flatten(0, 1)[rows].float()
        hidden = self.hidden.flatten(0, 1)[rows]  # [n, d]
        return (hidden @ self.head.to(hidden.dtype).t()).float()


@dataclass(frozen=True)
class RowLosses:
    """Detached per-row means over positions: next-token NLL ``nll [B]`` and KL ``kl [B]``."""

    nll: torch.Tensor
    kl: torch.Tensor


def _position_weights(row_weights: torch.Tensor, T: int) -> torch.Tensor:
    """``[B·T]`` weights: the row's weight over ``T − 1`` positions, 0 at the last position
    (it has no next token)."""
    per = row_weights[:, None].expand(-1, T).clone() / (T - 1)  # [B, T]
    per[:, -1] = 0
    return per.flatten()  # [B·T]


def _chunk_terms(s: torch.Tensor, targets: torch.Tensor, t_logits: torch.Tensor | None):
    """For a chunk's student logits ``s [n, V]`` (float32): NLL ``[n]``, KL ``[n]`` and the
    gradients of each with respect to ``s``: ``softmax(s) − onehot`` and ``softmax(s) − p_t``."""
    log_p = F.log_softmax(s, dim=-1)  # [n, V]
    p = log_p.exp()
    nll = -log_p.gather(-1, targets[:, None])[:, 0]  # [n]
    grad_nll = p.clone()
    grad_nll.scatter_add_(-1, targets[:, None], -torch.ones_like(nll)[:, None])
    if t_logits is None:
        return nll, torch.zeros_like(nll), grad_nll, None
    log_q = F.log_softmax(t_logits, dim=-1)  # [n, V]
    q = log_q.exp()
    kl = (q * (log_q - log_p)).sum(-1)  # [n]
    return nll, kl, grad_nll, p - q


def chunk_terms(s: torch.Tensor, targets: torch.Tensor, t_logits: torch.Tensor | None, weights: torch.Tensor,
                nll_weight: float, kl_weight: float):
    """A chunk's NLL ``[n]``, KL ``[n]`` and the gradient of ``Σ weights · (nll_weight · NLL +
    kl_weight · KL)`` with respect to its student logits ``s [n, V]`` (float32)."""
    nll, kl, grad_nll, grad_kl = _chunk_terms(s, targets, t_logits)
    grad_s = grad_nll * nll_weight if nll_weight != 0 else torch.zeros_like(s)
    if grad_kl is not None:
        grad_s = grad_s + kl_weight * grad_kl
    return nll, kl, grad_s * weights[:, None]


_COMPILED_TERMS: dict[str, object] = {}


def compiled_terms(backend: str):
    """:func:`chunk_terms` compiled with ``backend`` (one compiled function per backend): the
    chain of element-wise passes over ``[n, V]`` fused into a few kernels."""
    if backend not in _COMPILED_TERMS:
        _COMPILED_TERMS[backend] = torch.compile(chunk_terms, backend=backend, dynamic=False)
    return _COMPILED_TERMS[backend]


class _FusedObjective(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, head, targets, position_weights, teacher, nll_weight, kl_weight, chunk, terms):
        N = targets.numel()
        flat = hidden.flatten(0, 1)  # [N, d]
        grad_hidden = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        grad_head = torch.zeros(head.shape, dtype=torch.float32, device=head.device)
        nll = torch.empty(N, dtype=torch.float32, device=flat.device)
        kl = torch.empty(N, dtype=torch.float32, device=flat.device)
        for start in range(0, N, chunk):
            rows = slice(start, min(start + chunk, N))
            h = flat[rows]  # [n, d]
            s = (h @ head.to(h.dtype).t()).float()  # [n, V]
            t_logits = teacher.chunk_logits(rows) if (teacher is not None and kl_weight != 0) else None
            nll[rows], kl[rows], grad_s = terms(s, targets[rows], t_logits, position_weights[rows], nll_weight,
                                                kl_weight)
            # The gradients' matrix products run in the hidden states' precision (bfloat16
            # under autocast, as the forward's): ∂h = ∂s · W, ∂W = ∂sᵀ · h, summed in float32.
            grad_s = grad_s.to(h.dtype)
            grad_hidden[rows] = (grad_s @ head.to(h.dtype)).float()
            grad_head += (grad_s.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_head)
        ctx.hidden_shape, ctx.hidden_dtype, ctx.head_dtype = hidden.shape, hidden.dtype, head.dtype
        total = (position_weights * (nll_weight * nll + kl_weight * kl)).sum()
        ctx.mark_non_differentiable(nll, kl)
        return total, nll, kl

    @staticmethod
    def backward(ctx, grad_total, _grad_nll, _grad_kl):
        grad_hidden, grad_head = ctx.saved_tensors
        return ((grad_hidden * grad_total).reshape(ctx.hidden_shape).to(ctx.hidden_dtype),
                (grad_head * grad_total).to(ctx.head_dtype), None, None, None, None, None, None, None)


def _row_means(values: torch.Tensor, B: int, T: int) -> torch.Tensor:
    return values.view(B, T)[:, :-1].mean(-1)  # [B]


def fused_objective(hidden: torch.Tensor, head: torch.Tensor, input_ids: torch.Tensor, row_weights: torch.Tensor,
                    teacher: Teacher | None = None, *, nll_weight: float = 1.0, kl_weight: float = 1.0,
                    chunk: int = 4096, compile: str = "none") -> tuple[torch.Tensor, RowLosses]:
    """``Σ_r row_weights[r] · mean_t ℓ_rt`` (a 0-d tensor with gradients for ``hidden [B, T, d]``
    and ``head [V, d]``) and the detached per-row terms, in chunks of ``chunk`` positions.

    ``teacher=None`` (or ``kl_weight=0``) leaves the KL out. ``compile``: a ``torch.compile``
    backend for each chunk's element-wise work (:func:`compiled_terms`), ``'none'``: eager.
    """
    B, T = input_ids.shape
    if T < 2:
        raise ValueError("the objective needs sequences of two tokens at least")
    targets = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1).flatten()  # [B·T]; the last is unused
    weights = _position_weights(row_weights.float(), T)
    terms = chunk_terms if compile == "none" else compiled_terms(compile)
    total, nll, kl = _FusedObjective.apply(hidden, head, targets, weights, teacher, float(nll_weight),
                                           float(kl_weight), int(chunk), terms)
    return total, RowLosses(_row_means(nll, B, T), _row_means(kl, B, T))


def plain_objective(hidden: torch.Tensor, head: torch.Tensor, input_ids: torch.Tensor, row_weights: torch.Tensor,
                    teacher: Teacher | None = None, *, nll_weight: float = 1.0,
                    kl_weight: float = 1.0) -> tuple[torch.Tensor, RowLosses]:
    """:func:`fused_objective` written out plainly: whole logits ``[B, T, V]`` and autograd."""
    B, T = input_ids.shape
    logits = (hidden @ head.t()).float()[:, :-1]  # [B, T-1, V]
    log_p = F.log_softmax(logits, dim=-1)
    nll = -log_p.gather(-1, input_ids[:, 1:, None])[..., 0]  # [B, T-1]
    if teacher is not None and kl_weight != 0:
        t_logits = teacher.logits if teacher.logits is not None else teacher.hidden @ teacher.head.t()
        log_q = F.log_softmax(t_logits.float()[:, :-1], dim=-1)
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # [B, T-1]
    else:
        kl = torch.zeros_like(nll)
    per_row = (nll_weight * nll + kl_weight * kl).mean(-1)  # [B]
    return (row_weights.float() * per_row).sum(), RowLosses(nll.mean(-1).detach(), kl.mean(-1).detach())


def distillation_kl(log_probs: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, mean over tokens: ``log_probs [B, T-1, V]`` the
    student's next-token log-probabilities, ``teacher_logits [B, T, V]`` the teacher's logits."""
    teacher = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
    return F.kl_div(log_probs, teacher, log_target=True, reduction="none").sum(-1).mean()
