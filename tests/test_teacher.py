"""Teacher text: corpus prompts continued by the LM's own samples, as a token file; atomic files."""

from __future__ import annotations

import json
import subprocess
from unittest import mock

import pytest
import torch

from ppn_bayes import CharTokenizer, FitConfig, embedded_text, fit
from ppn_bayes.data import load_tokens, save_tokens
from ppn_bayes.decode.generation import Decoder
from ppn_bayes.lm import save_lm, tiny_llama
from ppn_bayes.decode.lm_text import teacher_tokens

CORPUS = torch.randint(0, 97, (500,), generator=torch.Generator().manual_seed(1))


def _lm():
    return tiny_llama(97, layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64, seed=0)


def test_sequences_are_corpus_prompts_and_continuations_and_repeat_with_the_seed():
    lm = _lm().train()
    tokens = teacher_tokens(lm, CORPUS, n_tokens=100, prompt_len=4, new_tokens=12, batch_size=3, progress=False)
    assert tokens.numel() == 3 * 3 * 16  # whole rounds of 3 sequences of 4 + 12 tokens, at least 100
    windows = {tuple(CORPUS[i:i + 4].tolist()) for i in range(CORPUS.numel() - 3)}
    for sequence in tokens.view(-1, 16):
        assert tuple(sequence[:4].tolist()) in windows  # the prompt is a corpus window
    again = teacher_tokens(lm, CORPUS, n_tokens=100, prompt_len=4, new_tokens=12, batch_size=3, progress=False)
    other = teacher_tokens(lm, CORPUS, n_tokens=100, prompt_len=4, new_tokens=12, batch_size=3, seed=1,
                           progress=False)
    assert torch.equal(tokens, again) and not torch.equal(tokens, other)
    assert lm.training  # left as it was found


def test_top_k_of_one_is_greedy_decoding():
    lm = _lm().eval()
    tokens = teacher_tokens(lm, CORPUS, n_tokens=16, prompt_len=4, new_tokens=12, batch_size=1, top_k=1,
                            progress=False)
    greedy = Decoder(lm, max_len=16, batch_size=1).generate(tokens[:4][None], 12)[0]
    assert torch.equal(tokens[4:], greedy)


@pytest.mark.parametrize("changes, message", [
    (dict(temperature=0.0), "temperature must be positive"),
    (dict(top_k=0), "top_k must be at least 1"),
    (dict(prompt_len=600), "fewer than one prompt"),
    (dict(n_tokens=0), "n_tokens must be at least 1"),
])
def test_bad_settings_are_named(changes, message):
    settings = dict(n_tokens=10, prompt_len=4, new_tokens=4, batch_size=1, progress=False) | changes
    with pytest.raises(ValueError, match=message):
        teacher_tokens(_lm(), CORPUS, **settings)


def test_token_files_are_written_whole_and_read_back(tmp_path):
    path = save_tokens(tmp_path / "t.safetensors", torch.arange(7), metadata={"what": "test"})
    assert torch.equal(load_tokens(path), torch.arange(7))
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temporary file left
    with pytest.raises(ValueError, match="1-D"):
        save_tokens(tmp_path / "u.safetensors", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="end in .safetensors"):
        save_tokens(tmp_path / "u.pt", torch.arange(3))


def test_the_cli_writes_text_a_fit_reads(tmp_path):
    tokenizer = CharTokenizer.for_text(embedded_text())
    save_lm(tiny_llama(tokenizer.vocab_size, layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64),
            tokenizer, tmp_path / "model")
    (tmp_path / "corpus.txt").write_text(embedded_text()[:5000])
    out = tmp_path / "teacher.safetensors"
    command = ["ppn-bayes", "teacher-text", "--model", str(tmp_path / "model"), "--data",
               str(tmp_path / "corpus.txt"), "--out", str(out), "--tokens", "200", "--prompt-len", "8",
               "--new-tokens", "24", "--batch-size", "4", "--quiet"]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    tokens = load_tokens(out)
    assert printed["tokens"] == tokens.numel() == 2 * 4 * 32
    assert int(tokens.max()) < tokenizer.vocab_size
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
    lm = tiny_llama(tokenizer.vocab_size, layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64)
    fitted = fit(lm, tokens, FitConfig(steps=2, batch_size=2, seq_len=16, mlp_group=32, log_every=1),
                 progress=False)
    assert len(fitted.result.history) == 2


def test_atomic_files_appear_whole_with_plain_permissions_or_not_at_all(tmp_path):
    import os

    from ppn_bayes.io import atomic_file, atomic_write_text

    atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no b.bin, no temporary file


def test_a_prompt_may_be_a_single_token_and_held_out_text_must_be_one_stream():
    tokens = teacher_tokens(_lm(), CORPUS, n_tokens=4, prompt_len=1, new_tokens=3, batch_size=1, progress=False)
    assert tokens.numel() == 4 and int(tokens[0]) in set(CORPUS.tolist())
    lm = tiny_llama(97, layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64)
    with pytest.raises(ValueError, match=r"one 1-D stream, got shape \(4, 40\)"):
        fit(lm, CORPUS, FitConfig(steps=1, batch_size=1, seq_len=16, mlp_group=32), progress=False,
            eval_tokens=torch.randint(0, 97, (4, 40)))


# -- the token store ----------------------------------------------------------------------------

STORE_SETTINGS = dict(n_tokens=200, prompt_len=4, new_tokens=12, batch_size=2, shard_tokens=40, temperature=0.5,
                      top_k=2, min_distinct=0.0, progress=False)


class Killed(Exception):
    """The process dies here (a simulated kill)."""


def _store(out, **changes):
    from ppn_bayes.store import tokenizer_identity
    from ppn_bayes.decode.lm_text import write_teacher_store

    return write_teacher_store(_lm(), CORPUS, out, tokenizer=tokenizer_identity(CharTokenizer(ALPHABET)),
                               **(STORE_SETTINGS | changes))


ALPHABET = "".join(chr(33 + i) for i in range(97))


def _frac_distinct(row: torch.Tensor, n: int = 4) -> float:
    """The slow reference: distinct n-grams over n-grams, with Python tuples."""
    grams = [tuple(row[i:i + n].tolist()) for i in range(len(row) - n + 1)]
    return len(set(grams)) / len(grams)


@pytest.mark.parametrize("kill_at", [1, 2, 5])
def test_a_resumed_teacher_store_equals_an_uninterrupted_one(tmp_path, kill_at):
    """Rounds of 2 x 16 tokens, a shard every 2 rounds (40 tokens or more), 7 rounds: killed
    while appending round ``kill_at`` then resumed, the store's files are the same."""
    from ppn_bayes.store import TokenStoreWriter, read_manifest

    whole = _store(tmp_path / "whole")
    assert whole.numel() == 7 * 32 and [s["tokens"] for s in whole.manifest["shards"]] == [64, 64, 64, 32]
    assert whole.source["stats"] == {"rounds": 7, "sequences": 14, "dropped": 0}
    real, calls = TokenStoreWriter.append, {"n": 0}

    def append_then_kill(self, *args, **kwargs):
        if calls["n"] == kill_at:
            raise Killed
        calls["n"] += 1
        real(self, *args, **kwargs)

    with mock.patch.object(TokenStoreWriter, "append", append_then_kill), pytest.raises(Killed):
        _store(tmp_path / "resumed")
    if kill_at < 2:  # killed before its first shard: nothing on disk
        assert not (tmp_path / "resumed").exists()
    else:
        assert read_manifest(tmp_path / "resumed")["total_tokens"] == 64 * (kill_at // 2)  # the whole shards
        with pytest.raises(ValueError, match=r"settings\.temperature: stored 0\.5, given 0\.6"):
            _store(tmp_path / "resumed", resume=True, temperature=0.6)
        with pytest.raises(FileExistsError, match="resume"):
            _store(tmp_path / "resumed")
    resumed = _store(tmp_path / "resumed", resume=True)
    files = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "resumed").iterdir()} == files
    assert torch.equal(resumed.tokens(), whole.tokens())
    assert torch.equal(_store(tmp_path / "resumed", resume=True).tokens(), whole.tokens())  # complete: as it is
    for sequence in whole.tokens().view(-1, 16):
        assert tuple(sequence[:4].tolist()) in {tuple(CORPUS[i:i + 4].tolist()) for i in range(497)}


def test_the_degenerate_guard_drops_exactly_the_sequences_with_few_distinct_4_grams(tmp_path):
    """Round r's sequences do not depend on min_distinct, so the guarded store is the
    unguarded one's sequences whose continuation keeps at least min_distinct distinct 4-grams
    (by a slow reference). 0.6 is no multiple of 1/9 (9 4-grams a continuation): no rounding decides."""
    everything = _store(tmp_path / "all", n_tokens=800).tokens().view(-1, 16)  # 25 rounds
    guarded = _store(tmp_path / "guarded", min_distinct=0.6)
    kept = guarded.tokens().view(-1, 16)
    rounds = guarded.source["stats"]["rounds"]
    expected = [s for s in everything[:2 * rounds] if _frac_distinct(s[4:]) >= 0.6]
    assert len(expected) == len(kept) and all(torch.equal(a, b) for a, b in zip(expected, kept))
    assert guarded.source["stats"] == {"rounds": rounds, "sequences": len(kept), "dropped": 2 * rounds - len(kept)}
    assert 0 < guarded.source["stats"]["dropped"] < 2 * rounds  # the guard had something to do
    assert guarded.source["settings"]["min_distinct"] == 0.6 and guarded.source["kind"] == "teacher-text"
    with pytest.raises(ValueError, match="min_distinct=0.5 dropped 16 of 16 sequences as degenerate"):
        _store(tmp_path / "greedy", top_k=1, min_distinct=0.5)  # this LM's greedy text repeats one token


@pytest.mark.parametrize("changes, message", [
    (dict(temperature=0.0), "temperature must be positive and finite"),
    (dict(temperature=float("nan")), "temperature must be positive and finite"),
    (dict(temperature=float("inf")), "temperature must be positive and finite"),
    (dict(top_k=0), "top_k must be at least 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(min_distinct=1.5), r"min_distinct must be in \[0, 1\]"),
    (dict(batch_size=0), "batch_size must be at least 1"),
    (dict(shard_tokens=0), "shard_tokens must be at least 1"),
    (dict(new_tokens=3, min_distinct=0.5), "new_tokens=3 has none"),
    (dict(new_tokens=2100), "exceeds the LM's 2048 positions"),
    (dict(prompt_len=600), "fewer than one prompt"),
    (dict(resume=True, overwrite=True), "exclude each other"),
])
def test_bad_generation_settings_are_named_before_anything_is_written(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        _store(tmp_path / "out", **changes)
    assert not (tmp_path / "out").exists()


def test_a_corpus_outside_the_vocabulary_is_refused(tmp_path):
    from ppn_bayes.store import tokenizer_identity
    from ppn_bayes.decode.lm_text import write_teacher_store

    with pytest.raises(ValueError, match="the corpus: token ids outside the LM's vocabulary of 97"):
        write_teacher_store(_lm(), CORPUS + 50, tmp_path / "out", tokenizer=tokenizer_identity(CharTokenizer("ab")),
                            **STORE_SETTINGS)
    assert not (tmp_path / "out").exists()


def test_the_cli_writes_and_resumes_a_store_a_mixture_reads(tmp_path, capsys):
    from ppn_bayes.cli import main
    from ppn_bayes.store import open_mixture

    tokenizer = CharTokenizer.for_text(embedded_text())
    save_lm(tiny_llama(tokenizer.vocab_size, layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64),
            tokenizer, tmp_path / "model")
    (tmp_path / "corpus.txt").write_text(embedded_text()[:5000])
    out = tmp_path / "teacher"
    command = ["teacher-text", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "corpus.txt"),
               "--out", str(out), "--tokens", "200", "--prompt-len", "8", "--new-tokens", "24", "--batch-size",
               "4", "--shard-tokens", "100", "--min-distinct", "0.2", "--quiet"]
    assert main(command) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["tokens"] == 2 * 4 * 32 and printed["rounds"] == 2 and printed["dropped"] == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(command) == 2 and "exists; pass --resume" in capsys.readouterr().err
    assert main(command + ["--resume"]) == 0  # complete: nothing to do
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert main(command + ["--temperature", "0.9", "--resume"]) == 2
    assert "settings.temperature: stored 0.8, given 0.9" in capsys.readouterr().err
    assert main(command + ["--top-p", "0", "--overwrite"]) == 2 and "top_p must be in (0, 1]" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # refused before anything was replaced
    command[command.index(str(out))] = str(tmp_path / "one.safetensors")
    assert main(command) == 2 and "--resume and --shard-tokens need a token store" in capsys.readouterr().err
    mixture = open_mixture([f"{out}:1", f"{tmp_path / 'corpus.txt'}:1"], tokenizer, seq_len=16,
                           vocab_size=tokenizer.vocab_size)
    assert mixture.batch(0, 4).shape == (4, 16)


def test_top_p_reaches_the_decoder():
    """The nucleus of a tiny top_p is the most likely token alone: greedy decoding, as top_k=1.
    Before the Decoder samples with top_p, asking for it is refused before any work."""
    import inspect

    settings = dict(n_tokens=32, prompt_len=4, new_tokens=12, batch_size=2, progress=False)
    if "top_p" not in inspect.signature(Decoder.generate).parameters:
        with pytest.raises(ValueError, match="has no top_p sampling"):
            teacher_tokens(_lm(), CORPUS, top_p=0.5, **settings)
        return
    nucleus = teacher_tokens(_lm(), CORPUS, top_k=None, top_p=1e-6, **settings)
    assert torch.equal(nucleus, teacher_tokens(_lm(), CORPUS, top_k=1, **settings))
