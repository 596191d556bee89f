"""The perplexity harness's per-token losses, against a slow reference."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lm

from ppn_bayes.inspect.evaluate import context_buckets, perplexity

TOKENS = torch.randint(0, 97, (5 * 32 + 7,), generator=torch.Generator().manual_seed(3))


def test_every_token_loss_is_the_reference_cross_entropy_and_their_mean_is_the_nll():
    """Window by window, in float64: -log softmax(logits)[next token]. float32 log-softmax over
    97 logits of size ~1 errs by a few ulps of the log-sum-exp (~5), so ~1e-6 absolute."""
    lm = tiny_lm("llama")
    result = perplexity(lm, TOKENS, seq_len=32, batch_size=2, per_token=True)
    assert result.token_nll.shape == (5, 31) and result.token_nll.dtype == torch.float32  # the 7 left over dropped
    windows = TOKENS[:160].view(5, 32)
    with torch.no_grad():
        for w in range(5):
            logits = lm.double()(input_ids=windows[w:w + 1]).logits[0, :-1]
            want = -torch.log_softmax(logits, -1).gather(-1, windows[w, 1:, None])[:, 0]
            torch.testing.assert_close(result.token_nll[w].double(), want, rtol=0, atol=1e-5)
    # result.nll adds float32 sums of a batch's 62 losses: each errs by at most 61 · 2⁻²⁴ ≈ 3.6e-6 of itself
    assert result.nll == pytest.approx(float(result.token_nll.double().mean()), rel=4e-6)
    plain = perplexity(lm.float(), TOKENS, seq_len=32, batch_size=2)
    # the same sums in another order: the NLLs differ by up to twice that, and exp multiplies a relative
    # error of the NLL (~4.6 nats here) by the NLL: under 2 · 3.6e-6 · 4.6 ≈ 3.3e-5
    assert plain.token_nll is None and plain.ppl == pytest.approx(result.ppl, rel=4e-5)
    assert set(result.to_dict()) == {"ppl", "nll", "windows", "seq_len"}


def test_nll_by_context_covers_every_column_once_in_doubling_buckets():
    lm = tiny_lm("llama")
    result = perplexity(lm, TOKENS, seq_len=32, per_token=True)
    buckets = result.nll_by_context()
    assert [(b["context_from"], b["context_to"]) for b in buckets] == [(1, 1), (2, 3), (4, 7), (8, 15), (16, 31)]
    assert [b["tokens"] for b in buckets] == [5, 10, 20, 40, 80]
    for b in buckets:  # column j predicts from j + 1 tokens
        want = result.token_nll[:, b["context_from"] - 1:b["context_to"]].double().mean()
        assert b["nll"] == float(want)
    total = sum(b["nll"] * b["tokens"] for b in buckets) / sum(b["tokens"] for b in buckets)
    assert total == pytest.approx(result.nll, rel=2e-5)  # one float32 sum of 5 · 31 losses: ≤ 154 · 2⁻²⁴
    with pytest.raises(ValueError, match="per_token=True"):
        perplexity(lm, TOKENS, seq_len=32).nll_by_context()


def test_context_buckets_double_and_stop_at_the_window():
    assert context_buckets(0) == [] and context_buckets(1) == [(1, 1)]
    assert context_buckets(6) == [(1, 1), (2, 3), (4, 6)]
    assert context_buckets(2047)[-2:] == [(512, 1023), (1024, 2047)] and len(context_buckets(2047)) == 11
