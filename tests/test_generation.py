"""The static-cache decoder against slow references: the LM's full forward without a
cache, Hugging Face ``generate``, the LM's own eager attention, the eager decode step,
and plain-Python samplers and n-gram counts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_lm
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface

from ppn_bayes.core.architecture import describe
from ppn_bayes.decode.generation import (GROUPED_ATTENTION, Decoder, StaticKVCache, distinct_ngram_fraction,
                                  grouped_attention, noise_width, sample_tokens, timed_generate)
from ppn_bayes.core.ranking import Masks


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny LMs gain nothing from threads, and lose much on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompt(batch: int = 1, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_without_cache(lm, input_ids: torch.Tensor, n: int) -> torch.Tensor:
    """The slow reference: the whole sequence through the LM for every new token."""
    ids, out = input_ids, []
    for _ in range(n):
        token = lm(input_ids=ids).logits[:, -1].argmax(-1)  # [B]
        out.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
    return torch.stack(out, dim=1)


def mixed_widths_masks(arch) -> Masks:
    """Layers of different widths: layer 0 keeps one attention unit and no MLP unit,
    layer 1 is dropped, layer 2 keeps no attention unit and two MLP units."""
    layer = torch.tensor([True, False, True])
    unit = torch.zeros(arch.n_layers, arch.n_units, dtype=torch.bool)
    A = arch.n_attention_units
    unit[0, 1] = True
    unit[2, A:A + 2] = True
    costs = torch.tensor(arch.layer_cost)[layer].sum() + torch.tensor(arch.unit_cost)[unit].sum()
    return Masks(arch, layer, unit, size_requested=0.0, kept_params=int(costs), total_params=arch.total_cost)


def test_greedy_decoding_equals_the_uncached_reference(family):
    lm = tiny_lm(family)
    ids = prompt(batch=2)
    decoder = Decoder(lm, max_len=40, batch_size=2)
    assert torch.equal(decoder.generate(ids, 20), greedy_without_cache(lm, ids, 20))


def test_a_multi_token_forward_gives_the_full_forwards_logits(family):
    lm = tiny_lm(family)
    ids, more = prompt(length=6), prompt(length=4, seed=1)
    decoder = Decoder(lm, max_len=16)
    last = decoder.prefill(ids)
    logits = decoder.forward(more)  # [1, 4, V] at positions 6..9
    with torch.no_grad():
        full = lm(input_ids=torch.cat([ids, more], dim=1)).logits  # [1, 10, V]
    torch.testing.assert_close(last, full[:, 5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, full[:, 6:], rtol=1e-5, atol=1e-5)
    assert decoder.length == 10


def test_sdpa_attention_gives_the_same_tokens():
    lm = tiny_lm("llama")
    lm.config._attn_implementation = "sdpa"
    ids = prompt(batch=2)
    assert torch.equal(Decoder(lm, max_len=40, batch_size=2).generate(ids, 16), greedy_without_cache(lm, ids, 16))


def test_rollback_forgets_the_rejected_positions():
    lm = tiny_lm("llama")
    ids = prompt(length=5)
    decoder = Decoder(lm, max_len=20)
    decoder.prefill(ids)
    decoder.forward(prompt(length=4, seed=3))  # positions 5..8, then three of them rejected
    decoder.rollback(6)
    replaced = prompt(length=3, seed=4)
    after = decoder.forward(replaced)
    fresh = Decoder(lm, max_len=20)
    fresh.prefill(torch.cat([ids, prompt(length=4, seed=3)[:, :1]], dim=1))
    torch.testing.assert_close(after, fresh.forward(replaced), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="roll back"):
        decoder.rollback(decoder.length + 1)


def test_a_sub_network_with_different_widths_per_layer_decodes_like_hf_generate(family):
    from ppn_bayes.deploy.subnetwork import build_subnetwork

    lm = tiny_lm(family)
    sub = build_subnetwork(lm, mixed_widths_masks(describe(lm, mlp_group=32)))
    ids = prompt()
    decoder = Decoder(sub, max_len=30)
    tokens = decoder.generate(ids, 16)
    with torch.no_grad():
        expected = sub.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(tokens, expected)
    assert torch.equal(tokens, greedy_without_cache(sub, ids, 16))
    heads = [layer.keys.shape[1] for layer in decoder.cache.layers]
    assert heads == [1, 0]  # one key/value group in the first kept layer, none in the second


def test_the_cache_is_allocated_once_and_reused():
    lm = tiny_lm("llama")
    decoder = Decoder(lm, max_len=32)
    decoder.generate(prompt(), 8)
    pointers = [layer.keys.data_ptr() for layer in decoder.cache.layers]
    decoder.generate(prompt(length=3, seed=2), 12)
    assert [layer.keys.data_ptr() for layer in decoder.cache.layers] == pointers
    assert decoder.cache.nbytes == 3 * 2 * (1 * 2 * 32 * 8) * 4  # layers x (k, v) x [B, H, S, D] x fp32


@pytest.mark.slow
def test_inductor_compiled_decoding_gives_the_same_tokens():
    torch._dynamo.reset()
    lm = tiny_lm("llama")
    lm.config._attn_implementation = "sdpa"
    ids = prompt()
    decoder = Decoder(lm, max_len=32, compile=True)
    assert torch.equal(decoder.generate(ids, 12), greedy_without_cache(lm, ids, 12))


def test_timed_generation_reports_the_greedy_tokens():
    lm = tiny_lm("llama")
    ids = prompt()
    decoder = Decoder(lm, max_len=32)
    timing = timed_generate(decoder, ids, 10, warmup=1)
    assert torch.equal(timing.tokens, decoder.generate(ids, 10))
    record = timing.to_dict()
    assert record["new_tokens"] == 10 and record["batch_size"] == 1
    assert record["seconds"] > record["prefill_seconds"] > 0
    assert record["tokens_per_s"] == pytest.approx(10 / record["seconds"])


def test_sampling_follows_the_generator():
    lm = tiny_lm("llama")
    decoder = Decoder(lm, max_len=32)
    ids = prompt()
    first = decoder.generate(ids, 10, temperature=1.0, generator=torch.Generator().manual_seed(1))
    again = decoder.generate(ids, 10, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)


def test_bad_input_is_refused_with_a_reason():
    lm = tiny_lm("llama")
    decoder = Decoder(lm, max_len=10)
    with pytest.raises(ValueError, match="batch_size=1"):
        decoder.generate(prompt(batch=2), 2)
    with pytest.raises(ValueError, match="positions"):
        decoder.generate(prompt(length=7), 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(prompt(), 0)
    with pytest.raises(ValueError, match="max_len"):
        Decoder(lm, max_len=1000)  # beyond the LM's 256 positions
    with pytest.raises(ValueError, match="max_len"):
        StaticKVCache(0)
    flash = tiny_lm("llama")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        Decoder(flash, max_len=10)
    windowed = tiny_lm("mistral", sliding_window=8)
    with pytest.raises(ValueError, match="sliding window"):
        Decoder(windowed, max_len=16)


# -- grouped attention ---------------------------------------------------------------------------
# Tolerances: fp32 throughout; the grouped path does the eager path's operations in the same
# order per element, but its matrix products have other shapes (G * q rows per group instead
# of q rows per head), so a kernel may sum a dot product of D <= 16 terms (scores) or S <= 40
# terms (weights x values) in another order: a few units in the last place of values of
# order 1 (fp32 eps 1.2e-7) per product, through 3 layers: well under 1e-5.
def test_grouped_attention_equals_the_eager_attention_with_expanded_groups():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    B, KV, G, q, S, D = 2, 3, 3, 4, 11, 8
    query, key, value = (torch.randn(B, h, t, D, generator=g) for h, t in ((KV * G, q), (KV, S), (KV, S)))
    allowed = torch.rand(B, 1, q, S, generator=g) > 0.3
    allowed[..., 0] = True  # every query attends to something
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = torch.nn.Module().eval()
    module.num_key_value_groups = G
    expected, _ = eager_attention_forward(module, query, key, value, additive, scaling=D ** -0.5)  # [B, q, H, D]
    out, weights = grouped_attention(module, query, key, value, additive, scaling=D ** -0.5)
    assert out.shape == (B, q, KV * G, D) and weights is None
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    boolean, _ = grouped_attention(module, query, key, value, allowed, scaling=D ** -0.5)
    torch.testing.assert_close(boolean, expected, rtol=1e-6, atol=1e-6)


def test_an_lm_switched_to_grouped_attention_gives_its_eager_logits(family):
    """The whole forward, no cache: also the 2-D-mask path (transformers builds the mask)."""
    lm = tiny_lm(family)
    ids = prompt(batch=2, length=12)
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
        lm.config._attn_implementation = GROUPED_ATTENTION
        grouped = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(grouped, expected, rtol=1e-5, atol=1e-5)


def test_the_decoder_runs_grouped_attention_and_restores_the_lms_own(monkeypatch):
    calls = []
    original = AttentionInterface._global_mapping[GROUPED_ATTENTION]

    def counting(module, query, *args, **kwargs):
        calls.append(query.shape[2])  # q of the call
        return original(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, GROUPED_ATTENTION, counting)
    lm = tiny_lm("llama")
    lm.config._attn_implementation = "sdpa"
    ids, more = prompt(length=6), prompt(length=3, seed=1)
    decoder = Decoder(lm, max_len=16)
    decoder.prefill(ids)
    logits = decoder.forward(more)
    tokens = decoder.generate(ids, 4)
    assert calls == [6] * 3 + [3] * 3 + [6] * 3 + [1] * 3 * 3  # 3 layers a call; 3 decode steps
    assert lm.config._attn_implementation == "sdpa"
    own = Decoder(lm, max_len=16, grouped_attention=False)
    own.prefill(ids)
    torch.testing.assert_close(logits, own.forward(more), rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, own.generate(ids, 4))
    assert len(calls) == 18  # the LM's own attention ran there


def test_a_layer_without_attention_units_gives_zeros():
    module = torch.nn.Module().eval()
    query, key = torch.zeros(2, 0, 1, 8), torch.zeros(2, 0, 5, 8)
    out, _ = grouped_attention(module, query, key, key, None)
    assert out.shape == (2, 1, 0, 8)
    with pytest.raises(ValueError, match="do not split"):
        grouped_attention(module, torch.zeros(1, 4, 1, 8), torch.zeros(1, 3, 5, 8), torch.zeros(1, 3, 5, 8), None)


# -- sampling ------------------------------------------------------------------------------------------
def allowed_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> set[int]:
    """The slow reference: candidates by sorting in Python, the nucleus by summing in float64."""
    values = logits.double().tolist()
    order = sorted(range(len(values)), key=lambda i: -values[i])[:top_k]
    if top_p is None:
        return set(order)
    weights = [math.exp((values[i] - values[order[0]]) / temperature) for i in order]
    total, mass, kept = sum(weights), 0.0, []
    for i, w in zip(order, weights):
        if mass >= top_p:
            break
        assert abs(mass - top_p) > 1e-4  # no boundary that float32 rounding could decide
        kept.append(i)
        mass += w / total
    return set(kept)


@pytest.mark.parametrize("top_k, top_p", [(None, None), (5, None), (1, None), (8, 0.6), (None, 0.3), (12, 1.0)])
def test_draws_come_only_from_the_allowed_tokens_and_each_of_them_comes(top_k, top_p):
    g = torch.Generator().manual_seed(3)
    V, draws, temperature = 23, 3000, 0.8
    logits = torch.randn(2, V, generator=g) * 0.5  # distinct values (one top-k set), none negligible
    width = noise_width(V, temperature=temperature, top_k=top_k, top_p=top_p)
    assert width == (top_k or V)
    rows = logits.repeat_interleave(draws, 0)  # [2 * draws, V]
    tokens = sample_tokens(rows, torch.rand(rows.shape[0], width, generator=g), temperature=temperature,
                           top_k=top_k, top_p=top_p).view(2, draws)
    for row in range(2):
        allowed = allowed_tokens(logits[row], temperature, top_k, top_p)
        assert set(tokens[row].tolist()) == allowed  # nothing else, and every allowed token at least once


def test_draws_follow_the_renormalised_tempered_distribution():
    """Gumbel-max is a draw from the softmax over the kept candidates: counts of 20000
    seeded draws against it, chi-square below its 99.9% point (a fixed seed: deterministic)."""
    g = torch.Generator().manual_seed(5)
    V, n, temperature, top_k, top_p = 17, 20000, 0.7, 9, 0.9
    logits = torch.randn(V, generator=g)
    allowed = sorted(allowed_tokens(logits, temperature, top_k, top_p))
    probs = torch.softmax(logits.double()[allowed] / temperature, 0)
    tokens = sample_tokens(logits.expand(n, V), torch.rand(n, top_k, generator=g), temperature=temperature,
                           top_k=top_k, top_p=top_p)
    counts = torch.tensor([(tokens == t).sum().item() for t in allowed], dtype=torch.float64)
    statistic = float(((counts - n * probs) ** 2 / (n * probs)).sum())
    chi2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}
    assert len(allowed) >= 2 and statistic < chi2_999[len(allowed) - 1]


def test_temperature_zero_is_the_argmax_and_needs_no_noise():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_tokens(logits), logits.argmax(-1))
    assert noise_width(11, temperature=0.0, top_k=3) == 0


def test_seeded_sampled_generation_repeats_exactly_and_another_seed_differs():
    lm = tiny_lm("llama")
    decoder = Decoder(lm, max_len=40, batch_size=3)
    ids = prompt(batch=3)
    options = dict(temperature=0.8, top_k=20, top_p=0.9)

    def run(seed):
        return decoder.generate(ids, 24, generator=torch.Generator().manual_seed(seed), **options)

    first = run(1)
    assert torch.equal(first, run(1)) and not torch.equal(first, run(2))
    assert first.shape == (3, 24) and 0 <= int(first.min()) and int(first.max()) < 97


def test_the_compiled_decode_step_equals_the_eager_step_bit_for_bit():
    """Whole sampled generations through the compiled step against the same generations
    step by step in eager mode: the same tokens and the same cache, bit for bit. The step
    is traced once for all positions, prompts and seeds (one more graph for greedy).
    ``aot_eager`` traces the graph as inductor receives it (functionalised ATen ops) and
    runs it without code generation."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    lm = tiny_lm("llama")
    ids, other = prompt(batch=2), prompt(batch=2, seed=5)
    options = dict(temperature=0.9, top_k=30, top_p=0.95)
    counter = CompileCounterWithBackend("aot_eager")
    eager = Decoder(lm, max_len=40, batch_size=2)
    compiled = Decoder(lm, max_len=40, batch_size=2, compile=True, compile_backend=counter)
    for decoder in (eager, compiled):
        decoder.generate(ids, 20, generator=torch.Generator().manual_seed(0), **options)
    tokens = compiled.generate(other, 20, generator=torch.Generator().manual_seed(1), **options)
    assert counter.frame_count == 1  # 2 x 19 steps, one graph
    assert torch.equal(tokens, eager.generate(other, 20, generator=torch.Generator().manual_seed(1), **options))
    for mine, theirs in zip(compiled.cache.layers, eager.cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    assert torch.equal(compiled.generate(other, 12), eager.generate(other, 12))  # greedy too
    assert counter.frame_count == 2


def test_attending_to_cache_blocks_gives_the_same_tokens():
    """With ``cache_block`` the decode steps attend to fewer (masked-out) positions: the
    same tokens, greedy and sampled; compiled, one graph per block end reached."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    lm = tiny_lm("llama")
    ids = prompt(batch=2, length=5)
    options = dict(temperature=0.9, top_k=30)
    whole = Decoder(lm, max_len=40, batch_size=2)
    blocks = Decoder(lm, max_len=40, batch_size=2, cache_block=8)
    assert torch.equal(blocks.generate(ids, 30), whole.generate(ids, 30))
    seeded = [d.generate(ids, 30, generator=torch.Generator().manual_seed(2), **options) for d in (whole, blocks)]
    assert torch.equal(*seeded)
    assert blocks.cache.visible is None  # other forwards see the whole cache
    counter = CompileCounterWithBackend("eager")
    compiled = Decoder(lm, max_len=40, batch_size=2, cache_block=16, compile=True, compile_backend=counter)
    assert torch.equal(compiled.generate(ids, 30), whole.generate(ids, 30))
    assert counter.frame_count == 3  # positions 5..33 end blocks at 16, 32 and 40 (max_len)
    with pytest.raises(ValueError, match="cache_block"):
        Decoder(lm, max_len=40, cache_block=0)


@pytest.mark.slow
def test_inductor_compiled_sampling_gives_the_eager_tokens():
    torch._dynamo.reset()
    lm = tiny_lm("llama")
    ids = prompt(batch=2)
    options = dict(temperature=0.8, top_k=10)
    compiled = Decoder(lm, max_len=32, batch_size=2, compile=True)
    tokens = compiled.generate(ids, 12, generator=torch.Generator().manual_seed(0), **options)
    eager = Decoder(lm, max_len=32, batch_size=2).generate(ids, 12, generator=torch.Generator().manual_seed(0),
                                                            **options)
    assert torch.equal(tokens, eager)


def test_bad_sampling_settings_are_named():
    decoder = Decoder(tiny_lm("llama"), max_len=16)
    for settings, message in ((dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
                              (dict(temperature=1.0, top_k=0), "top_k"), (dict(temperature=1.0, top_p=0.0), "top_p"),
                              (dict(temperature=1.0, top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=message):
            decoder.generate(prompt(), 4, **settings)


# -- the degenerate-sample guard -------------------------------------------------------------------------
def distinct_fraction_slowly(row: list[int], n: int) -> float:
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return len(set(grams)) / len(grams)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(1, 4), st.integers(n, 30), st.integers(1, 2 ** 40), st.sampled_from([2, 3, 50000]))))
def test_distinct_ngram_fraction_equals_counting_in_python(case):
    n, rows, length, seed, vocab = case
    tokens = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    fraction = distinct_ngram_fraction(tokens, n)
    assert fraction.dtype == torch.float32 and fraction.shape == (rows,)
    expected = torch.tensor([distinct_fraction_slowly(row, n) for row in tokens.tolist()])
    assert torch.equal(fraction, expected)


def test_a_looping_row_scores_low_and_bad_shapes_are_refused():
    loop = torch.tensor([[1, 2, 3, 4] * 8, list(range(32))])
    assert torch.equal(distinct_ngram_fraction(loop), torch.tensor([4.0, 29.0]) / 29)  # 4 of 29; all 29
    with pytest.raises(ValueError, match="no 4-gram"):
        distinct_ngram_fraction(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        distinct_ngram_fraction(torch.zeros(5, dtype=torch.long))


# -- the teacher-speed benchmark, rehearsed on a tiny LM ------------------------------------------
def test_teacher_speed_benchmark_runs_without_pyro_and_writes_its_records(tmp_path):
    """benchmarks/teacher_speed.py on the CPU with a tiny LM, in a process where pyro and
    arviz cannot be imported (as on the GPU machine): one record per plan entry."""
    from ppn_bayes import CharTokenizer, embedded_text
    from ppn_bayes.lm import save_lm, tiny_llama

    text = embedded_text()[:20_000]
    (tmp_path / "text.txt").write_text(text)
    tokenizer = CharTokenizer.for_text(text)
    save_lm(tiny_llama(tokenizer.vocab_size, layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64),
            tokenizer, tmp_path / "lm")
    records = tmp_path / "records"
    plan = "grouped-eager@3,own-eager@2"  # the compiled step: test_the_compiled_decode_step_...
    args = ["--gguf", str(tmp_path / "lm"), "--corpus", str(tmp_path / "text.txt"), "--device", "cpu", "--quick",
            "--plan", plan, "--records-dir", str(records), "--model-name", "tiny"]
    script = ("import runpy, sys; sys.modules['pyro'] = sys.modules['arviz'] = None; "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "benchmarks" / "teacher_speed.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (records / "teacher.jsonl").read_text().splitlines()]
    assert [(r["method"], r["batch"]) for r in rows] == [("grouped-eager", 3), ("own-eager", 2)]
    for r in rows:
        assert r["benchmark"] == "teacher" and r["model"] == "tiny" and r["quick"] is True
        assert r["versions"]["pyro"] is None  # it ran without pyro
        assert r["tokens_per_s"] == pytest.approx(r["rounds"] * r["batch"] * r["new_tokens"] / r["seconds"])
        assert r["prompt_len"] == r["new_tokens"] == 8 and r["top_k"] == 50 and r["temperature"] == 0.8
        assert 0 < r["distinct_4gram_mean"] <= 1 and len(r["sample_text"]) == 16  # one char a token
        assert r["machine"].startswith("cpu") and r["command"] and r["date"]
    assert [r["attention"] for r in rows] == [GROUPED_ATTENTION, "sdpa"]
    assert not rows[0]["compiled"] and rows[0]["compile_backend"] is None
