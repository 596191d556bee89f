"""Teacher text: corpus prompts continued by the LM's own samples, as a token file; atomic files."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from ppn_bayes import CharTokenizer, FitConfig, embedded_text, fit
from ppn_bayes.data import load_tokens, save_tokens
from ppn_bayes.generation import Decoder
from ppn_bayes.lm import save_lm, tiny_llama
from ppn_bayes.teacher import teacher_tokens

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
