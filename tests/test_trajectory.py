"""Masks over a fit (ppn_bayes.inspect.trajectory): per-layer counts read back from the fit's
evaluation rows, against the fit's own masks and a slow reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppn_bayes import CharTokenizer, FitConfig, embedded_text, fit, tokenize
from ppn_bayes.cli import main
from ppn_bayes.inspect.trajectory import (evaluated_sizes, mask_trajectory, plot_mask_trajectory,
                                          read_validation)
from ppn_bayes.lm import tiny_llama

TOKENIZER = CharTokenizer.for_text(embedded_text())
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny Llama (3 layers, 2 attention and 4 MLP units a layer) fitted for 5 steps with
    held-out evaluations at steps 2, 4 and 5, at sizes 0.7 and 0.3, with its checkpoint."""
    text = embedded_text()
    lm = tiny_llama(TOKENIZER.vocab_size, layers=3, hidden=32, heads=2, kv_heads=2, intermediate=64)
    config = FitConfig(steps=5, batch_size=2, seq_len=32, mlp_group=16, lr_lm=1e-3, eval_every=2, eval_windows=2,
                       size_min=0.3, eval_sizes=(0.7, 0.3), lr_guide=0.5)
    checkpoint = tmp_path_factory.mktemp("fit") / "ckpt"
    return fit(lm, tokenize(text[:40_000], TOKENIZER), config, progress=False, checkpoint=checkpoint,
               eval_tokens=tokenize(text[60_000:63_000], TOKENIZER))


def _reference_counts(kept: str, layers: int, attention: int, mlp: int) -> list[tuple[int, int]]:
    """Slow reference: walk the mask string (layers, then each layer's attention units, then its
    MLP units) and count, a dropped layer counting nothing."""
    out = []
    for layer in range(layers):
        start = layers + layer * (attention + mlp)
        if kept[layer] == "0":
            out.append((0, 0))
            continue
        out.append((kept[start:start + attention].count("1"), kept[start + attention:start + attention + mlp].count("1")))
    return out


def test_the_last_evaluation_is_the_fits_deployed_masks(fitted):
    """The last evaluation is at the last step: its per-layer counts are those of the fit's own
    masks at that size, and every evaluation's counts are the slow reference's."""
    arch = fitted.guide.arch
    assert (arch.n_layers, arch.n_attention_units, arch.n_mlp_units) == (3, 2, 4)
    assert evaluated_sizes(fitted.result.validation) == [0.7, 0.3]
    for size in (0.7, 0.3):
        trajectory = mask_trajectory(fitted.result.validation, arch, size)
        assert trajectory.steps.tolist() == [2, 4, 5]
        masks = fitted.masks(size)
        unit = masks.unit & masks.layer[:, None]
        assert trajectory.kept() == list(zip(unit[:, :2].sum(1).tolist(), unit[:, 2:].sum(1).tolist()))
        np.testing.assert_array_equal(trajectory.layer[-1], masks.layer.numpy())
        for row, attention, mlp in zip(fitted.result.validation, trajectory.attention, trajectory.mlp):
            match = next(s for s in row["sizes"] if s["size"] == size)
            assert list(zip(attention.tolist(), mlp.tolist())) == _reference_counts(match["kept"], 3, 2, 4)
        assert trajectory.nll.tolist() == [next(s["nll"] for s in row["sizes"] if s["size"] == size)
                                           for row in fitted.result.validation]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 5), st.data())
def test_counts_match_the_slow_reference(layers, attention, mlp, data):
    """Any mask string of the right length: the counts are the reference's, and the changed
    layers are those whose counts or keep differ between the two evaluations."""
    length = layers + layers * (attention + mlp)
    strings = [data.draw(st.text("01", min_size=length, max_size=length)) for _ in range(2)]
    rows = [{"step": i, "sizes": [{"size": 0.5, "nll": 1.0, "kept": s}]} for i, s in enumerate(strings)]
    arch = type("Arch", (), {"n_layers": layers, "n_attention_units": attention, "n_mlp_units": mlp})
    trajectory = mask_trajectory(rows, arch, 0.5)
    reference = [_reference_counts(s, layers, attention, mlp) for s in strings]
    assert [trajectory.kept(i) for i in range(2)] == reference
    assert trajectory.changed_layers() == [
        layer for layer in range(layers)
        if (strings[0][layer], reference[0][layer]) != (strings[1][layer], reference[1][layer])]


def test_bad_rows_are_refused_by_name(fitted):
    arch = fitted.guide.arch
    rows = fitted.result.validation
    with pytest.raises(ValueError, match="no evaluation rows"):
        mask_trajectory([], arch, 0.5)
    with pytest.raises(ValueError, match=r"size 0.5 has no masks at step 2; sizes with masks at every "
                                         r"evaluation: 0.7, 0.3"):
        mask_trajectory(rows, arch, 0.5)
    short = [{**rows[0], "sizes": [{**rows[0]["sizes"][1], "kept": rows[0]["sizes"][1]["kept"][:-1]}]}]
    with pytest.raises(ValueError, match=r"step 2: the masks hold 20 marks, not the 21 of 3 layers × "
                                         r"\(1 \+ 2 attention \+ 4 MLP units\)"):
        mask_trajectory(short, arch, 0.3)


def test_a_validation_file_reads_back_and_a_bad_line_is_named(fitted, tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in fitted.result.validation))
    assert read_validation(path) == fitted.result.validation
    path.write_text(json.dumps(fitted.result.validation[0]) + "\n{\"step\": 4}\n")
    with pytest.raises(ValueError, match="line 2: not an evaluation row"):
        read_validation(path)
    path.write_text("{\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        read_validation(path)


def test_the_plot_is_written_whole(fitted, tmp_path):
    trajectory = mask_trajectory(fitted.result.validation, fitted.guide.arch, 0.3)
    fig = plot_mask_trajectory(trajectory, path=tmp_path / "masks.png")
    assert (tmp_path / "masks.png").read_bytes()[:8] == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["masks.png"]  # no temporary left beside it
    heat = fig.axes[1].images[0].get_array()
    np.testing.assert_array_equal(heat.mask, ~trajectory.layer.T)  # grey: the layers dropped
    np.testing.assert_allclose(heat.filled(0), np.where(trajectory.layer.T, trajectory.attention.T / 2, 0))


def test_summarize_writes_the_masks_over_the_fit(fitted, tmp_path):
    """ppn-bayes summarize on a checkpoint whose evaluations kept their masks: the per-layer
    counts of each evaluated size (JSON) and one plot a size beside the posterior's files."""
    pytest.importorskip("arviz")
    out = tmp_path / "summary"
    assert main(["summarize", fitted.result.checkpoint, "--out", str(out), "--sizes", "0.5", "--draws", "8"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "ambiguous.json", "forest.png", "keep_curves.png", "masks_over_fit.json", "masks_over_fit_0.3.png",
        "masks_over_fit_0.7.png", "posterior.nc", "summary.csv"]
    written = json.loads((out / "masks_over_fit.json").read_text())
    assert [t["size"] for t in written] == [0.7, 0.3]
    assert written[1] == mask_trajectory(fitted.result.validation, fitted.guide.arch, 0.3).to_dict()
    assert (out / "masks_over_fit_0.3.png").read_bytes()[:8] == PNG
    assert torch.equal(torch.tensor(written[1]["layer"][-1], dtype=torch.bool), fitted.masks(0.3).layer)
