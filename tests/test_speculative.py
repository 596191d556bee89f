"""Speculative decoding: greedy output equals plain greedy decoding for every draft size
and k (our loop and Hugging Face's assisted generation), a self-draft accepts every
token, sampling keeps the target's distribution, and bad drafts are refused."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import ROOT, tiny_lm

from ppn_bayes.core.architecture import describe
from ppn_bayes.data import CharTokenizer
from ppn_bayes.decode.generation import Decoder
from ppn_bayes.core.ranking import Ranking
from ppn_bayes.decode.speculative import (
    DraftChoice, DraftTrial, accept_greedy, accept_sampled, assisted_generate, check_draft, choose_draft,
    new_parameter_bytes, rank_sorted, shared_draft, speculative_generate,
)
from ppn_bayes.deploy.subnetwork import build_subnetwork

SIZES = (0.3, 0.5, 0.7)
NEW = 24


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny LMs gain nothing from threads, and lose much on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompt(length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def target():
    return tiny_lm("llama")


@pytest.fixture(scope="module")
def drafts(target):
    ranking = Ranking.random(describe(target, mlp_group=32), seed=1)
    return {size: build_subnetwork(target, ranking.masks(size)) for size in SIZES}


@pytest.fixture(scope="module")
def plain(target):
    return Decoder(target, max_len=64).generate(prompt(), NEW)


# -- greedy: the output is the target's --------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_greedy_speculation_equals_plain_greedy_for_every_k(target, drafts, plain, size):
    target_decoder = Decoder(target, max_len=64)
    draft_decoder = Decoder(drafts[size], max_len=64)
    rates = []
    for k in range(1, 9):
        run = speculative_generate(target_decoder, draft_decoder, prompt(), NEW, k=k)
        assert torch.equal(run.tokens, plain), f"size {size}, k {k}"
        assert sum(run.histogram) == run.steps and len(run.histogram) == k + 1
        assert run.steps * (run.mean_accepted + 1) >= NEW - 1  # every step emits accepted + 1 tokens
        rates.append(run.acceptance_rate)
    assert 0 < max(rates) <= 1  # the sub-network agrees with its target some of the time


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("k", (1, 3, 8))
def test_hf_assisted_generation_with_a_sub_network_equals_plain_greedy(target, drafts, plain, size, k):
    assert torch.equal(assisted_generate(target, drafts[size], prompt(), NEW, k=k), plain)


def test_every_family_speculates_exactly(family):
    lm = tiny_lm(family)
    draft = build_subnetwork(lm, Ranking.random(describe(lm, mlp_group=32), seed=2).masks(0.5))
    expected = Decoder(lm, max_len=64).generate(prompt(), NEW)
    assert torch.equal(speculative_generate(lm, draft, prompt(), NEW, k=3).tokens, expected)
    assert torch.equal(assisted_generate(lm, draft, prompt(), NEW, k=3), expected)


def test_a_draft_of_another_lm_changes_nothing_but_speed(target, plain):
    run = speculative_generate(target, tiny_lm("llama", seed=1), prompt(), NEW, k=4)
    assert torch.equal(run.tokens, plain)


@pytest.mark.parametrize("k", (1, 2, 5))
def test_a_self_draft_accepts_every_token(target, plain, k):
    run = speculative_generate(target, target, prompt(), NEW, k=k)
    assert torch.equal(run.tokens, plain)
    assert run.acceptance_rate == 1.0 and run.mean_accepted == k
    assert run.histogram[k] == run.steps and run.steps == -(-(NEW - 1) // (k + 1))
    record = run.to_dict()
    assert record["histogram"] == list(run.histogram) and record["tokens_per_step"] == k + 1


def test_padded_verification_changes_nothing(target, drafts, plain):
    run = speculative_generate(target, drafts[0.5], prompt(), NEW, k=2, verify_len=9)
    assert torch.equal(run.tokens, plain)
    with pytest.raises(ValueError, match="verify_len"):
        speculative_generate(target, drafts[0.5], prompt(), NEW, k=4, verify_len=4)


def test_compiled_decoding_traces_whole_and_serves_every_k_with_one_graph(plain):
    """The decoder's fixed-shape calls trace as whole graphs (``fullgraph=True``, the
    ``eager`` backend: tracing without code generation); after the first run neither
    another ``k`` (verification padded to 5 tokens) nor another prompt length recompiles."""
    torch._dynamo.reset()
    lm = tiny_lm("llama")
    lm.config._attn_implementation = "sdpa"
    draft = build_subnetwork(lm, Ranking.random(describe(lm, mlp_group=32), seed=1).masks(0.5))
    options = dict(max_len=64, compile=True, compile_backend="eager")
    target_decoder, draft_decoder = Decoder(lm, **options), Decoder(draft, **options)
    assert torch.equal(target_decoder.generate(prompt(), NEW), plain)
    run = speculative_generate(target_decoder, draft_decoder, prompt(), NEW, k=2, verify_len=5)
    assert torch.equal(run.tokens, plain)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in (1, 4):
            run = speculative_generate(target_decoder, draft_decoder, prompt(), NEW, k=k, verify_len=5)
            assert torch.equal(run.tokens, plain)
        other = prompt(length=4, seed=5)
        expected = Decoder(lm, max_len=64).generate(other, NEW)
        assert torch.equal(target_decoder.generate(other, NEW), expected)
        assert torch.equal(speculative_generate(target_decoder, draft_decoder, other, NEW, k=3, verify_len=5).tokens,
                           expected)


def test_greedy_acceptance_takes_the_agreeing_prefix_and_the_targets_token():
    logits = torch.full((4, 6), -1.0)
    logits[torch.arange(4), torch.tensor([2, 5, 1, 3])] = 1.0  # target argmax per position
    n, token = accept_greedy(logits, torch.tensor([2, 5, 0]))
    assert (n, token.tolist()) == (2, [1])
    n, token = accept_greedy(logits, torch.tensor([2, 5, 1]))
    assert (n, token.tolist()) == (3, [3])
    n, token = accept_greedy(logits, torch.tensor([4, 5, 1]))
    assert (n, token.tolist()) == (0, [2])


# -- sampling: the output is distributed as the target's ---------------------------------------
def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic with cells of small expected count pooled; and its degrees of freedom."""
    expected = probs.flatten().double() * counts.sum()
    counts = counts.flatten().double()
    small = expected < min_expected
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    counts = torch.cat([counts[~small], counts[small].sum()[None]])
    keep = expected > 0
    return float(((counts - expected)[keep] ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


# Upper 0.1% points of the chi-square distribution, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59,
            11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70, 16: 39.25, 17: 40.79, 18: 42.31, 19: 43.82,
            20: 45.31, 21: 46.80, 22: 48.27, 23: 49.73, 24: 51.18}


def test_the_sampling_rule_gives_the_target_distribution():
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])  # target, k + 1 rows
    q = torch.tensor([[0.1, 0.1, 0.7, 0.1], [0.7, 0.1, 0.1, 0.1]])  # draft, k rows
    generator = torch.Generator().manual_seed(0)
    n_trials = 4000
    first = torch.zeros(4)
    accepted = torch.zeros(3)
    for _ in range(n_trials):
        proposed = torch.stack([torch.multinomial(q[i], 1, generator=generator)[0] for i in range(2)])
        n, token = accept_sampled(p, q, proposed, generator=generator)
        emitted = torch.cat([proposed[:n], token])
        first[emitted[0]] += 1
        accepted[n] += 1
    statistic, dof = chi_square(first, p[0])
    assert statistic < CHI2_999[dof]
    # The draft's own distribution fails the same test: it has the power to catch a wrong rule.
    assert chi_square(first, q[0])[0] > 10 * CHI2_999[dof]
    # P(first proposal accepted) = sum_x min(p, q)
    assert accepted[1:].sum() / n_trials == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.03)


def test_speculative_sampling_draws_from_the_target():
    vocab = 5
    options = dict(vocab_size=vocab, initializer_range=0.5, num_hidden_layers=1)
    target, draft = tiny_lm("llama", seed=0, **options), tiny_lm("llama", seed=3, **options)
    ids = torch.tensor([[1, 3, 0]])

    @torch.no_grad()
    def joint(lm):  # exact P(t1, t2 | prompt): [V, V]
        first = torch.softmax(lm(input_ids=ids).logits[0, -1].double(), -1)
        rows = [torch.softmax(lm(input_ids=torch.cat([ids, torch.tensor([[a]])], 1)).logits[0, -1].double(), -1)
                for a in range(vocab)]
        return first[:, None] * torch.stack(rows)

    target_joint, draft_joint = joint(target), joint(draft)
    target_decoder, draft_decoder = Decoder(target, max_len=8), Decoder(draft, max_len=8)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(vocab, vocab)
    for _ in range(400):
        run = speculative_generate(target_decoder, draft_decoder, ids, 2, k=2, temperature=1.0, generator=generator)
        a, b = run.tokens[0].tolist()
        counts[a, b] += 1
    statistic, dof = chi_square(counts, target_joint)
    assert statistic < CHI2_999[dof]
    assert chi_square(counts, draft_joint)[0] > 10 * CHI2_999[dof]


# -- choosing the draft --------------------------------------------------------------------------
def test_choose_draft_measures_every_pair_and_recommends_one(target):
    ranking = Ranking.random(describe(target, mlp_group=32), seed=1)
    seen = []
    choice = choose_draft(target, ranking, sizes=[0.3, 0.7], ks=[1, 3], prompts=[prompt()[0], prompt(5, 1)],
                          max_new_tokens=12, on_trial=seen.append)
    assert [(t.size_requested, t.k) for t in choice.trials] == [(0.3, 1), (0.3, 3), (0.7, 1), (0.7, 3)]
    assert seen == list(choice.trials)
    assert all(t.identical for t in choice.trials)
    assert choice.best is max(choice.trials, key=lambda t: t.tokens_per_s)
    for t in choice.trials:
        assert t.size_reached <= t.size_requested and t.new_tokens == 24
        assert t.speedup == pytest.approx(t.tokens_per_s / choice.baseline_tokens_per_s)
        assert t.draft_params < sum(p.numel() for p in target.model.layers.parameters())
    assert "recommended: " in choice.table()  # a size, or plain decoding: speed decides, on this machine
    assert choice.to_dict()["best"]["k"] == choice.best.k
    assert choice.to_dict()["best"]["beats_plain"] == (choice.best.speedup > 1) == (choice.warning is None)


def measured(size: float, k: int, speedup: float, identical: bool = True) -> DraftTrial:
    """A trial as if measured: 100 tokens at ``speedup`` over a target of 100 tokens/s."""
    return DraftTrial(size_requested=size, size_reached=size - 0.01, k=k, acceptance_rate=0.5, mean_accepted=1.0,
                      tokens_per_step=2.0, tokens_per_s=100 * speedup, speedup=speedup, identical=identical,
                      steps=50, histogram=(0,) * (k + 1), new_tokens=100, seconds=1 / speedup, draft_params=10,
                      draft_tokens_per_s=300.0)


def choice_of(*trials: DraftTrial) -> DraftChoice:
    return DraftChoice(trials=trials, baseline_tokens_per_s=100.0, baseline_seconds=1.0, new_tokens=100,
                       prompts=2, device="cpu", compiled=False)


def test_a_draft_that_beats_plain_decoding_is_recommended_and_marked():
    choice = choice_of(measured(0.3, 2, 0.9), measured(0.5, 2, 1.3), measured(0.5, 4, 1.6, identical=False))
    assert choice.best.speedup == 1.3 and choice.beats_plain and choice.warning is None
    table = choice.table().splitlines()
    assert [line.endswith("*") for line in table[2:5]] == [False, True, False]
    assert table[-2].startswith("size: requested fraction") and "*: recommended" in table[-2]
    assert "same: output equal to plain greedy decoding token for token" in table[-2]
    assert table[-1] == "recommended: size 0.5, k 2 (1.30x plain greedy decoding)"
    record = choice.to_dict()
    assert record["best"] == {"size": 0.5, "k": 2, "speedup": 1.3, "beats_plain": True} and record["warning"] is None


def test_when_no_draft_beats_plain_decoding_none_is_recommended_and_a_warning_says_so():
    choice = choice_of(measured(0.3, 2, 0.42), measured(0.5, 2, 1.0), measured(0.5, 4, 1.6, identical=False))
    assert choice.best.speedup == 1.0 and not choice.beats_plain  # as fast is not faster
    assert choice.warning == ("no draft beats plain greedy decoding here: the fastest, size 0.5 with k 2, runs at "
                              "1.00x; decode without a draft")
    table = choice.table()
    assert "*" not in table and "recommended: size" not in table
    assert table.splitlines()[-1] == ("recommended: no draft, plain greedy decoding (the fastest draft, size 0.5 "
                                      "with k 2, runs at 1.00x)")
    record = choice.to_dict()
    assert record["best"]["beats_plain"] is False and record["warning"] == choice.warning


def test_choose_draft_shows_its_sweep_on_request(target, drafts, capsys):
    common = dict(sizes=[0.3, 0.5], ks=[2], prompts=[prompt()], max_new_tokens=4, warmup=False)
    choose_draft(target, drafts, **common, progress=True)
    bar = capsys.readouterr().err
    assert "speculate: 100%" in bar and "3/3 [" in bar  # plain decoding, then one step a trial
    choose_draft(target, drafts, **common)
    assert capsys.readouterr().err == ""


def test_choose_draft_takes_ready_drafts(target, drafts):
    choice = choose_draft(target, drafts, sizes=[0.5], ks=[2], prompts=[prompt()], max_new_tokens=8, warmup=False)
    assert len(choice.trials) == 1 and choice.trials[0].identical
    with pytest.raises(ValueError, match="no draft of size"):
        choose_draft(target, drafts, sizes=[0.4], ks=[2], prompts=[prompt()], max_new_tokens=8)


# -- drafts that share the target's weights ------------------------------------------------------
def storages(module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters() if p.numel()}


@pytest.mark.parametrize("size", (0.3, 0.7))
def test_a_shared_draft_is_made_of_views_of_the_rank_sorted_target(target, plain, size):
    ranking = Ranking.random(describe(target, mlp_group=32), seed=1)
    ranked, ranked_ranking = rank_sorted(target, ranking)
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(ranked(input_ids=ids).logits, target(input_ids=ids).logits)
        draft = shared_draft(ranked, ranked_ranking, size)
        copied = build_subnetwork(target, ranking.masks(size))
        torch.testing.assert_close(draft(input_ids=ids).logits, copied(input_ids=ids).logits)
    assert new_parameter_bytes(draft, ranked) == 0
    assert storages(draft) <= storages(ranked)
    assert new_parameter_bytes(copied, ranked) == sum(p.numel() * 4 for p in copied.parameters())
    layer = draft.model.layers[0]
    if layer.self_attn.q_proj.weight.numel():
        assert layer.self_attn.q_proj.weight.is_contiguous()  # a row prefix
    if layer.mlp.down_proj.weight.shape[1] < 128:
        assert not layer.mlp.down_proj.weight.is_contiguous()  # a column prefix: a strided view
    assert torch.equal(speculative_generate(ranked, draft, ids, NEW, k=3).tokens, plain)


def test_a_shared_gpt2_draft_copies_only_the_fused_attention_it_cuts():
    lm = tiny_lm("gpt2")
    ranking = Ranking.random(describe(lm, mlp_group=32), seed=1)
    ranked, ranked_ranking = rank_sorted(lm, ranking)
    draft = shared_draft(ranked, ranked_ranking, 0.5)
    fused = [layer.attn.c_attn for layer in draft.transformer.h if layer.attn.c_attn.weight.shape[1] < 96]
    assert fused  # some layer keeps part of its attention: q|k|v is then no prefix
    added = sum(t.numel() * 4 for c in fused for t in (c.weight, c.bias))
    assert new_parameter_bytes(draft, ranked) == added
    expected = Decoder(lm, max_len=64).generate(prompt(), NEW)
    assert torch.equal(speculative_generate(ranked, draft, prompt(), NEW, k=3).tokens, expected)


def test_a_shared_draft_needs_a_rank_sorted_target(target):
    ranking = Ranking.random(describe(target, mlp_group=32), seed=1)
    with pytest.raises(ValueError, match="rank order"):
        shared_draft(target, ranking, 0.5)


# -- the command line and the benchmark script ----------------------------------------------------
@pytest.fixture(scope="module")
def ranked_checkpoint(tmp_path_factory, target):
    from ppn_bayes.deploy.resize import export_ranked
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("speculate")
    ranking = Ranking.random(describe(target, mlp_group=32), seed=1)
    export_ranked(target, folder / "ranked", ranking=ranking)
    save_file({"tokens": torch.randint(0, 97, (400,), generator=torch.Generator().manual_seed(0))},
              str(folder / "tokens.safetensors"))
    return folder


def test_the_speculate_command_measures_and_recommends(ranked_checkpoint, capsys):
    from ppn_bayes.cli import main

    folder = ranked_checkpoint
    args = [str(folder / "ranked"), "--sizes", "0.4", "0.8", "--ks", "2", "3", "--data",
            str(folder / "tokens.safetensors"), "--n-prompts", "2", "--prompt-len", "6", "--max-new-tokens", "10"]
    assert main(["speculate", *args, "--out", str(folder / "choice.json")]) == 0
    printed = capsys.readouterr()
    table = printed.out
    assert "recommended: " in table and table.count(" yes") == 4
    assert "5/5 [" in printed.err  # the sweep's progress: plain decoding and four trials
    result = json.loads((folder / "choice.json").read_text())
    assert len(result["trials"]) == 4 and result["best"]["k"] in (2, 3)
    assert ("ppn-bayes speculate: warning: no draft beats" in printed.err) == (result["warning"] is not None)
    assert main(["speculate", *args, "--shared", "--recommend", "--quiet"]) == 0
    printed = capsys.readouterr()
    best = json.loads(printed.out.strip().splitlines()[-1])
    assert set(best) == {"size", "k", "speedup", "beats_plain"}
    assert "%|" not in printed.err  # --quiet: no bar
    assert ("warning: no draft beats" in printed.err) == (not best["beats_plain"])
    assert main(["speculate", *args, "--out", str(folder / "choice.json")]) == 2  # exists: refused
    assert main(["speculate", *args[:-2], "--max-new-tokens", "0"]) == 2


def test_the_speculate_command_warns_when_no_draft_beats_plain_decoding(ranked_checkpoint, monkeypatch, capsys,
                                                                        tmp_path):
    import ppn_bayes.decode.speculative
    from ppn_bayes.cli import main

    slow = choice_of(measured(0.4, 2, 0.42), measured(0.8, 2, 0.7))
    monkeypatch.setattr(ppn_bayes.decode.speculative, "choose_draft", lambda *args, **kwargs: slow)  # speed is not ours
    folder = ranked_checkpoint
    assert main(["speculate", str(folder / "ranked"), "--data", str(folder / "tokens.safetensors"), "--quiet",
                 "--out", str(tmp_path / "choice.json")]) == 0
    printed = capsys.readouterr()
    assert printed.err.strip() == ("ppn-bayes speculate: warning: no draft beats plain greedy decoding here: the "
                                   "fastest, size 0.8 with k 2, runs at 0.70x; decode without a draft")
    assert "recommended: no draft" in printed.out
    result = json.loads((tmp_path / "choice.json").read_text())
    assert result["warning"] == slow.warning and result["best"]["beats_plain"] is False


def test_the_speculate_command_cuts_a_plain_model_with_a_mask_file(tmp_path, target, capsys):
    from ppn_bayes.cli import main
    from ppn_bayes.lm import save_lm
    from ppn_bayes.deploy.maskfile import save_masks

    save_lm(target, CharTokenizer("".join(map(chr, range(32, 129)))), tmp_path / "lm")  # 97 characters
    save_masks(tmp_path / "masks.json", Ranking.random(describe(target, mlp_group=32), seed=1), sizes=[0.5],
               lm=target)
    from safetensors.torch import save_file

    save_file({"tokens": torch.arange(60) % 97}, str(tmp_path / "tokens.safetensors"))
    common = ["--sizes", "0.5", "--ks", "2", "--data", str(tmp_path / "tokens.safetensors"), "--prompt-len", "5",
              "--n-prompts", "1", "--max-new-tokens", "6"]
    assert main(["speculate", str(tmp_path / "lm"), "--masks", str(tmp_path / "masks.json"), *common]) == 0
    assert "recommended" in capsys.readouterr().out
    assert main(["speculate", str(tmp_path / "lm"), *common]) == 2
    assert "mask file" in capsys.readouterr().err


def test_the_benchmark_script_writes_one_record_per_pair(ranked_checkpoint, tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("speculative_benchmark", ROOT / "benchmarks" / "speculative.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses look their module up there
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        assert script.main(["--model", str(ranked_checkpoint / "ranked"), "--quick", "--device", "cpu", "--data",
                            str(ranked_checkpoint / "tokens.safetensors"), "--records-dir", str(tmp_path),
                            "--shared", "--threads", "1", "--model-name", "tiny"]) == 0
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (tmp_path / "speculative.jsonl").read_text().splitlines()]
    assert [(r["size_requested"], r["k"]) for r in records] == [(0.3, 2), (0.3, 4), (0.5, 2), (0.5, 4),
                                                                 (0.7, 2), (0.7, 4)]
    for r in records:
        assert r["identical_output"] and r["identical_output_fp32"] and r["quick"]
        assert r["settings"]["draft_added_bytes"] == 0
        assert r["ratio_vs_target"] == pytest.approx(r["tokens_per_s"] / r["baseline_tokens_per_s"])
        assert sum(r["histogram"]) == r["steps"] and r["model"] == "tiny" and r["dtype"] == "float32"
    # bf16: the identity is also checked in float32
    try:
        assert script.main(["--model", str(ranked_checkpoint / "ranked"), "--quick", "--device", "cpu", "--data",
                            str(ranked_checkpoint / "tokens.safetensors"), "--records-dir", str(tmp_path / "bf16"),
                            "--dtype", "bfloat16", "--sizes", "0.5", "--ks", "3", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    (record,) = [json.loads(line) for line in (tmp_path / "bf16" / "speculative.jsonl").read_text().splitlines()]
    assert record["dtype"] == "bfloat16" and record["identical_output_fp32"] is True
    # a copied draft adds at least its decoder's parameters (2 bytes each in bf16), and its embeddings
    assert record["settings"]["draft_added_bytes"] > 2 * record["settings"]["draft_params"]


# -- bad input -----------------------------------------------------------------------------------
def test_a_draft_with_another_vocabulary_is_refused(target):
    other = tiny_lm("llama", vocab_size=98)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, other, prompt(), 4, k=2)
    with pytest.raises(ValueError, match="vocabulary"):
        assisted_generate(target, other, prompt(), 4, k=2)
    with pytest.raises(ValueError, match="vocabulary"):
        choose_draft(target, {0.5: other}, sizes=[0.5], ks=[2], prompts=[prompt()], max_new_tokens=4)


def test_a_draft_with_another_tokenizer_is_refused(target):
    ours = CharTokenizer("abcdefghij")
    check_draft(target, target, target_tokenizer=ours, draft_tokenizer=CharTokenizer("abcdefghij"))
    with pytest.raises(ValueError, match="tokenizer"):
        check_draft(target, target, target_tokenizer=ours, draft_tokenizer=CharTokenizer("abcdefghik"))
    with pytest.raises(ValueError, match="both tokenizers"):
        check_draft(target, target, target_tokenizer=ours)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_a_draft_length_below_one_is_refused(target, k):
    with pytest.raises(ValueError, match="k must be an integer of at least 1"):
        speculative_generate(target, target, prompt(), 4, k=k)
    with pytest.raises(ValueError, match="k must be an integer of at least 1"):
        assisted_generate(target, target, prompt(), 4, k=k)


def test_batches_are_refused(target):
    with pytest.raises(ValueError, match=r"one sequence at a time"):
        speculative_generate(target, target, torch.zeros(2, 5, dtype=torch.long), 4, k=2)
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(Decoder(target, max_len=32, batch_size=2), target, prompt(), 4, k=2)


def test_a_decoder_too_short_for_the_run_is_refused(target):
    with pytest.raises(ValueError, match="cache positions"):
        speculative_generate(Decoder(target, max_len=12), target, prompt(), 4, k=2)
