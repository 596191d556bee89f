"""The fit's objective in chunks (objective.fused_objective) against whole logits and autograd."""

from __future__ import annotations

import pytest
import torch

from ppn_bayes.core.objective import Teacher, fused_objective, plain_objective


def _problem(seed: int, B=3, T=7, d=8, V=11, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g, dtype=dtype).requires_grad_(True)
    head = torch.randn(V, d, generator=g, dtype=dtype).requires_grad_(True)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    weights = torch.rand(B, generator=g)
    teacher_hidden = torch.randn(B, T, d, generator=g, dtype=dtype)
    teacher_head = torch.randn(V, d, generator=g, dtype=dtype)
    return hidden, head, input_ids, weights, teacher_hidden, teacher_head


@pytest.mark.parametrize("chunk", [1, 4, 21, 1000])
@pytest.mark.parametrize("nll_weight, kl_weight", [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.3, 2.0)])
@pytest.mark.parametrize("teacher_kind", ["hidden", "logits", None])
def test_the_chunked_objective_equals_the_plain_one(chunk, nll_weight, kl_weight, teacher_kind):
    """Values and gradients. Both sum the same float32 terms (log-softmaxes over 11 logits of
    order 10, products with hidden states of 8 entries) in other orders and groupings, so
    they agree to a few float32 ulps of the loss (~1e-6 relative); 1e-5 leaves a margin of
    ten. The per-row NLL and KL come from the same log-softmax rows: 1e-6."""
    hidden, head, input_ids, weights, t_hidden, t_head = _problem(seed=chunk)
    teacher = {"hidden": Teacher(hidden=t_hidden, head=t_head), "logits": Teacher(logits=t_hidden @ t_head.t()),
               None: None}[teacher_kind]
    fused, fused_rows = fused_objective(hidden, head, input_ids, weights, teacher, nll_weight=nll_weight,
                                        kl_weight=kl_weight, chunk=chunk)
    grads = torch.autograd.grad(1.7 * fused, [hidden, head])
    plain, plain_rows = plain_objective(hidden, head, input_ids, weights, teacher, nll_weight=nll_weight,
                                        kl_weight=kl_weight)
    want = torch.autograd.grad(1.7 * plain, [hidden, head])
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_rows.nll, plain_rows.nll, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_rows.kl, plain_rows.kl, rtol=1e-6, atol=1e-6)


def test_the_kl_of_a_student_that_is_its_teacher_is_zero_and_the_last_position_is_not_scored():
    hidden, head, input_ids, weights, _, _ = _problem(seed=0)
    _, rows = fused_objective(hidden, head, input_ids, weights, Teacher(hidden=hidden.detach(), head=head.detach()),
                              nll_weight=1.0, kl_weight=1.0, chunk=5)
    assert torch.all(rows.kl.abs() < 1e-6)
    # The last position predicts nothing scored: its hidden state changes no loss.
    total_a, _ = fused_objective(hidden, head, input_ids, weights, nll_weight=1.0, kl_weight=0.0)
    hidden_b = hidden.detach().clone()
    hidden_b[:, -1] += 1.0
    total_b, _ = fused_objective(hidden_b, head, input_ids, weights, nll_weight=1.0, kl_weight=0.0)
    assert torch.equal(total_a.detach(), total_b.detach())


def test_a_teacher_needs_logits_or_hidden_states_with_a_head():
    with pytest.raises(ValueError, match="either logits or hidden"):
        Teacher()
    with pytest.raises(ValueError, match="either logits or hidden"):
        Teacher(hidden=torch.zeros(1, 2, 3))
