"""The static-cache decoder against slow references: the LM's full forward without a
cache, and Hugging Face ``generate``."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lm

from ppn_bayes.architecture import describe
from ppn_bayes.generation import Decoder, StaticKVCache, timed_generate
from ppn_bayes.ranking import Masks


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
    from ppn_bayes.subnetwork import build_subnetwork

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
