"""The artifacts layer: a path's kind, where each kind keeps its tokenizer, and the full LM
with its ranking (what speculative decoding's targets are opened with)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lm

from ppn_bayes.data import CharTokenizer
from ppn_bayes.deploy.artifacts import checkpoint_kind, open_ranked_lm, open_tokenizer
from ppn_bayes.deploy.maskfile import save_masks
from ppn_bayes.deploy.resize import export_ranked
from ppn_bayes.deploy.subnetwork import build_subnetwork, save_subnetwork
from ppn_bayes.inspect.baselines import magnitude_ranking
from ppn_bayes.io import FileFormatError
from ppn_bayes.lm import save_lm

TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def lm_and_ranking():
    lm = tiny_lm("llama", seed=3)
    return lm, magnitude_ranking(lm, mlp_group=16)


def _same_tokenizer(tokenizer) -> bool:
    return isinstance(tokenizer, CharTokenizer) and tokenizer.encode(TEXT) == CharTokenizer.for_text(TEXT).encode(TEXT)


def test_each_kind_keeps_its_tokenizer_where_open_tokenizer_looks(tmp_path, lm_and_ranking):
    lm, ranking = lm_and_ranking
    tokenizer = CharTokenizer.for_text(TEXT)
    with_tok = export_ranked(lm, tmp_path / "ranked", ranking=ranking, tokenizer=tokenizer)
    without = export_ranked(lm, tmp_path / "ranked-bare", ranking=ranking)
    sub = save_subnetwork(build_subnetwork(lm, ranking.masks(0.5)), tokenizer, tmp_path / "sub")
    hf = save_lm(lm, tokenizer, tmp_path / "hf")
    fit = tmp_path / "fit"  # what checkpoint_kind and open_tokenizer look at in a fit checkpoint
    (fit / "lm").mkdir(parents=True)
    (fit / "state.json").write_text("{}")
    assert [checkpoint_kind(p) for p in (with_tok, sub, hf, fit)] == ["ranked", "subnetwork", "hf", "fit"]
    assert _same_tokenizer(open_tokenizer(with_tok)) and open_tokenizer(without) is None
    assert open_tokenizer(fit) is None
    tokenizer.save_pretrained(fit / "lm")
    assert _same_tokenizer(open_tokenizer(fit))
    assert _same_tokenizer(open_tokenizer(sub)) and _same_tokenizer(open_tokenizer(hf, "hf"))
    (sub / "char_tokenizer.json").unlink()  # a sub-network's tokenizer is required
    with pytest.raises(FileFormatError):
        open_tokenizer(sub)


def test_open_ranked_lm_gives_the_same_cuts_from_a_ranked_checkpoint_and_from_a_mask_file(tmp_path, lm_and_ranking):
    lm, ranking = lm_and_ranking
    tokenizer = CharTokenizer.for_text(TEXT)
    ranked = open_ranked_lm(export_ranked(lm, tmp_path / "ranked", ranking=ranking, tokenizer=tokenizer))
    hf = save_lm(lm, tokenizer, tmp_path / "hf")
    save_masks(tmp_path / "masks.json", ranking, sizes=[0.5], lm=lm)
    dense = open_ranked_lm(hf, masks_file=tmp_path / "masks.json")
    assert (ranked.kind, ranked.ranked, dense.kind, dense.ranked) == ("ranked", True, "hf", False)
    ids = torch.tensor([tokenizer.encode(TEXT)]) % lm.config.vocab_size
    with torch.no_grad():
        a = build_subnetwork(ranked.lm, ranked.ranking.masks(0.5))(ids).logits
        b = build_subnetwork(dense.lm, dense.ranking.masks(0.5))(ids).logits
    # the same units in another order: equal up to the order of float32 sums
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds no ranking"):
        open_ranked_lm(hf)
    with pytest.raises(ValueError, match="carries its ranking"):
        open_ranked_lm(tmp_path / "ranked", masks_file=tmp_path / "masks.json")
