"""Resizing from a ranked checkpoint: equal to the in-memory builder, prefix reads, bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import expected_params, tiny_lm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppn_bayes.core.architecture import describe
from ppn_bayes.io import FileFormatError
from ppn_bayes.core.ranking import Ranking
from ppn_bayes.deploy.resize import export_ranked, open_ranked, resize
from ppn_bayes.deploy.subnetwork import (build_subnetwork, decoder_params, held_params, load_subnetwork,
                                         selection_from_masks)

torch.set_num_threads(1)

TOKENS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
ATOL = 1e-5


def _logits(lm):
    with torch.no_grad():
        return lm(input_ids=TOKENS).logits


def _ranking(lm, seed=0):
    arch = describe(lm, mlp_group=32)
    generator = torch.Generator().manual_seed(seed)
    return Ranking.from_log_lambda(arch, torch.randn(arch.n_layers, generator=generator),
                                   2 * torch.randn(arch.n_layers, arch.n_units, generator=generator))


@pytest.mark.parametrize("family,overrides", [("llama", {"tie_word_embeddings": True}), ("qwen3", {}),
                                              ("gpt2", {})])
def test_resize_equals_build_subnetwork(tmp_path, family, overrides):
    lm = tiny_lm(family, seed=1, **overrides)
    ranking = _ranking(lm)
    ranked = export_ranked(lm, tmp_path / "ranked", ranking=ranking)
    assert not (ranked / "config.json").exists()  # from_pretrained must not take it for an LM
    full = resize(ranked, 1.0)
    torch.testing.assert_close(_logits(full.lm), _logits(lm), atol=ATOL, rtol=1e-5)  # sorting preserves function
    for size in (0.8, 0.55, 0.3, 0.12):
        result = resize(ranked, size, tmp_path / f"sub-{size}")
        masks = ranking.masks(size)
        expected = build_subnetwork(lm, masks)
        torch.testing.assert_close(_logits(result.lm), _logits(expected), atol=ATOL, rtol=1e-5)
        assert result.kept_params == masks.kept_params
        assert decoder_params(result.lm) == decoder_params(expected)  # less the idle layers' norms, as built
        assert result.size_reached == masks.size_reached
        assert 0 < result.bytes_read < result.checkpoint_bytes
        loaded = load_subnetwork(tmp_path / f"sub-{size}")
        torch.testing.assert_close(_logits(loaded), _logits(result.lm), atol=0, rtol=0)
    by_count = resize(ranked, n_params=ranking.total_params // 2)
    assert by_count.kept_params == ranking.masks_for_params(ranking.total_params // 2).kept_params


def test_every_size_is_a_prefix_of_each_tensor(tmp_path):
    lm = tiny_lm("llama", seed=2)
    ranking = _ranking(lm, seed=4)
    checkpoint = open_ranked(export_ranked(lm, tmp_path / "ranked", ranking=ranking))
    assert torch.equal(checkpoint.base_ranking().items, ranking.items)
    smallest = float(ranking.cost[0]) / ranking.total_params
    read = []
    for size in torch.linspace(smallest * 1.01, 1.0, 20).tolist():
        selection = selection_from_masks(checkpoint.masks(size))
        for attention, mlp in zip(selection.attention, selection.mlp):
            assert attention == tuple(range(len(attention)))
            assert mlp == tuple(range(len(mlp)))
        read.append(resize(checkpoint, size).bytes_read)
    assert read == sorted(read)  # larger sizes read more


def test_bad_input(tmp_path):
    from safetensors.torch import load_file, save_file

    lm = tiny_lm("llama", seed=3)
    ranking = _ranking(lm)
    ranked = export_ranked(lm, tmp_path / "ranked", ranking=ranking)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_ranked(lm, ranked, ranking=ranking)
    for size in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="size"):
            resize(ranked, size)
    with pytest.raises(ValueError, match="smallest"):
        resize(ranked, n_params=int(ranking.cost[0]) - 1)
    out = tmp_path / "sub"
    resize(ranked, 0.5, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        resize(ranked, 0.4, out)
    assert resize(ranked, 0.4, out, overwrite=True).out == str(out)
    with pytest.raises(FileFormatError, match="not a directory"):
        resize(tmp_path / "absent", 0.5)
    with pytest.raises(FileFormatError, match="no file"):
        resize(out, 0.5)  # a sub-network, not a ranked checkpoint
    index = json.loads((ranked / "ranked.json").read_text())
    (ranked / "ranked.json").write_text(json.dumps({**index, "format_version": 99}))
    with pytest.raises(FileFormatError, match="version 99"):
        resize(ranked, 0.5)
    (ranked / "ranked.json").write_text(json.dumps(index))
    tensors = load_file(ranked / "ranked.safetensors")
    missing = next(k for k in tensors if "down_proj" in k)
    del tensors[missing]
    save_file(tensors, ranked / "ranked.safetensors")
    with pytest.raises(FileFormatError, match=f"lacks tensor {missing}"):
        resize(ranked, 0.5)


# -- property: mangled checkpoints give a clear error or the very same sub-network ------------
@pytest.fixture(scope="module")
def ranked_bytes(tmp_path_factory):
    lm = tiny_lm("llama", seed=5, tie_word_embeddings=True)
    ranked = export_ranked(lm, tmp_path_factory.mktemp("ranked") / "ranked", ranking=_ranking(lm, seed=5))
    expected = _logits(resize(ranked, 0.5).lm)
    return (ranked / "ranked.json").read_bytes(), (ranked / "ranked.safetensors").read_bytes(), expected


def _write_ranked(tmp_path, index: bytes, tensors: bytes):
    directory = tmp_path / "mangled"
    directory.mkdir(exist_ok=True)
    (directory / "ranked.json").write_bytes(index)
    (directory / "ranked.safetensors").write_bytes(tensors)
    return directory


def _clear_error_or_same(directory, expected):
    try:
        result = resize(directory, 0.5)
    except (FileFormatError, ValueError) as err:
        assert str(err).strip()
        return
    torch.testing.assert_close(_logits(result.lm), expected, atol=0, rtol=0)


_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(position=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255), in_header=st.booleans())
def test_flipped_tensor_file_bytes(tmp_path, ranked_bytes, position, flip, in_header):
    index, tensors, expected = ranked_bytes
    data = bytearray(tensors)
    header = 8 + int.from_bytes(tensors[:8], "little")
    data[int(position * (header if in_header else len(data)))] ^= flip
    _clear_error_or_same(_write_ranked(tmp_path, index, bytes(data)), expected)


@_SETTINGS
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_tensor_file(tmp_path, ranked_bytes, cut):
    index, tensors, _ = ranked_bytes
    with pytest.raises(FileFormatError):
        resize(_write_ranked(tmp_path, index, tensors[: int(cut * len(tensors))]), 0.5)


@_SETTINGS
@given(which=st.floats(0, 1, exclude_max=True), value=st.none() | st.integers(-5, 50) | st.text(max_size=4)
       | st.lists(st.integers(0, 3), max_size=3))
def test_edited_index_fields(tmp_path, ranked_bytes, which, value):
    index, tensors, expected = ranked_bytes
    data = json.loads(index)
    paths = []

    def walk(node, prefix):
        if prefix:
            paths.append(prefix)
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, prefix + (key,))
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, prefix + (i,))

    walk(data, ())
    path = paths[int(which * len(paths))]
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    _clear_error_or_same(_write_ranked(tmp_path, json.dumps(data).encode(), tensors), expected)


# -- the command line, end to end on a tiny fitted network -------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from ppn_bayes.core.config import FitConfig
    from ppn_bayes.data import CharTokenizer, embedded_text, tokenize
    from ppn_bayes.fit import fit
    from ppn_bayes.lm import tiny_llama

    root = tmp_path_factory.mktemp("cli")
    text = embedded_text()[:20_000]
    (root / "text.txt").write_text(text)
    tokenizer = CharTokenizer.for_text(text)
    lm = tiny_llama(tokenizer.vocab_size, layers=3, hidden=32, heads=4, kv_heads=2, intermediate=128)
    fit(lm, tokenize(text, tokenizer), FitConfig(steps=3, batch_size=2, seq_len=32, mlp_group=32),
        checkpoint=root / "checkpoint", tokenizer=tokenizer, progress=False)
    return root


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from ppn_bayes.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_end_to_end(fitted, tmp_path, capsys):
    checkpoint, text = fitted / "checkpoint", fitted / "text.txt"
    code, out, err = _cli(capsys, "masks", checkpoint, "--sizes", 0.5, 0.3, "--params", 20000,
                          "--out", tmp_path / "masks.json")
    assert code == 0, err
    assert [round(m["size_requested"], 3) for m in json.loads(out)["masks"]] == [0.3, 0.432, 0.5]
    code, out, err = _cli(capsys, "export-ranked", checkpoint, "--out", tmp_path / "ranked")
    assert code == 0, err
    code, out, err = _cli(capsys, "masks", tmp_path / "ranked", "--sizes", 0.5, 0.3, "--params", 20000,
                          "--out", tmp_path / "masks-from-ranked.json")
    assert code == 0, err
    from_fit = json.loads((tmp_path / "masks.json").read_text())
    from_ranked = json.loads((tmp_path / "masks-from-ranked.json").read_text())
    for key in ("base_model", "architecture", "ranking", "masks"):
        assert from_fit[key] == from_ranked[key]  # the ranked checkpoint maps back to the fitted LM's units
    code, out, err = _cli(capsys, "resize", tmp_path / "ranked", "--size", 0.5, "--out", tmp_path / "sub")
    assert code == 0, err
    resized = json.loads(out)
    assert resized["bytes_read"] < resized["checkpoint_bytes"]
    code, out, err = _cli(capsys, "resize", checkpoint, "--size", 0.5, "--out", tmp_path / "sub-from-fit")
    assert code == 0, err
    evals = {}
    for name, argv in {
        "sub": [tmp_path / "sub"],
        "sub-from-fit": [tmp_path / "sub-from-fit"],
        "fit": [checkpoint, "--size", 0.5],
        "ranked": [tmp_path / "ranked", "--size", 0.5],
        "masked-dense": [checkpoint, "--masks", tmp_path / "masks.json", "--size", 0.5, "--masked-dense"],
    }.items():
        code, out, err = _cli(capsys, "eval", *argv, "--data", text, "--seq-len", 32, "--limit", 6, "--json",
                              "--quiet")
        assert code == 0, err
        evals[name] = json.loads(out)
    for name, record in evals.items():
        assert record["windows"] == 6 and record["seq_len"] == 32
        assert record["ppl"] == pytest.approx(evals["masked-dense"]["ppl"], rel=1e-5), name
    assert evals["fit"]["kept_params"] == evals["masked-dense"]["kept_params"]
    # The sub-network holds what the masks keep, less the norms of the kept layers left with no unit (this
    # tiny Llama's output projections have no bias, so such a layer is the identity and is left out).
    from ppn_bayes import load_fit

    fit = load_fit(checkpoint)
    assert evals["fit"]["decoder_params"] == expected_params(fit.lm, fit.masks(0.5))
    code, out, _ = _cli(capsys, "eval", checkpoint, "--data", text, "--seq-len", 32, "--limit", 6, "--quiet")
    assert code == 0 and "perplexity" in out


def test_a_size_the_fit_never_trained_warns_through_the_ranked_checkpoint_and_the_mask_file(fitted, tmp_path):
    from ppn_bayes import UntrainedSizeWarning, load_fit, load_masks, save_masks

    fit = load_fit(fitted / "checkpoint")
    assert fit.ranking().trained == (fit.config.size_min, fit.config.size_max) == (0.3, 1.0)
    ranked = export_ranked(fitted / "checkpoint", tmp_path / "ranked")
    assert open_ranked(ranked).ranking.trained == (0.3, 1.0)
    with pytest.warns(UntrainedSizeWarning, match=r"size 0\.2 lies outside the sizes the fit trained \(0\.3 to 1\)"):
        resize(ranked, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resize(ranked, 0.3)
    with pytest.warns(UntrainedSizeWarning):
        save_masks(tmp_path / "masks.json", fit.ranking(), sizes=(0.2, 0.5), lm=fit.lm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading the file back checks its masks without a warning
        loaded = load_masks(tmp_path / "masks.json", fit.lm)
    assert loaded.ranking.trained == (0.3, 1.0)
    with pytest.warns(UntrainedSizeWarning):
        loaded.masks_for(0.2)


def test_cli_bad_input(fitted, tmp_path, capsys):
    checkpoint = fitted / "checkpoint"
    ranked = tmp_path / "ranked"
    assert _cli(capsys, "export-ranked", checkpoint, "--out", ranked)[0] == 0
    for size in ("0", "1.5"):
        code, _, err = _cli(capsys, "resize", ranked, "--size", size, "--out", tmp_path / "x")
        assert code == 2 and "size" in err
    code, _, err = _cli(capsys, "resize", ranked, "--params", 3, "--out", tmp_path / "x")
    assert code == 2 and "smallest" in err
    assert not (tmp_path / "x").exists()
    assert _cli(capsys, "resize", ranked, "--size", 0.5, "--out", tmp_path / "sub")[0] == 0
    code, _, err = _cli(capsys, "resize", ranked, "--size", 0.5, "--out", tmp_path / "sub")
    assert code == 2 and "exists" in err
    code, _, err = _cli(capsys, "export-ranked", tmp_path / "sub", "--out", tmp_path / "y")
    assert code == 2 and "not a fit checkpoint" in err
    code, _, err = _cli(capsys, "masks", checkpoint, "--out", tmp_path / "m.json")
    assert code == 2 and "at least one size" in err
    code, _, err = _cli(capsys, "eval", tmp_path / "sub", "--size", 0.3, "--data", fitted / "text.txt")
    assert code == 2 and "already a sub-network" in err
    other = tmp_path / "other.json"
    assert _cli(capsys, "masks", checkpoint, "--sizes", 0.5, "--out", other)[0] == 0
    data = json.loads(other.read_text())
    data["masks"][0]["unit"][0][0] ^= 1
    other.write_text(json.dumps(data))
    code, _, err = _cli(capsys, "eval", checkpoint, "--masks", other, "--size", 0.5, "--data", fitted / "text.txt")
    assert code == 2 and "masks[0]" in err


@pytest.mark.slow
def test_smollm2_sub_network_and_resize_match_the_masked_reference(smollm2_path, tmp_path):
    """On the real model: sliced logits equal the masked-dense reference, and resizing from a
    ranked checkpoint gives the same sub-network while reading under 65% of it at 0.5."""
    from ppn_bayes.core.gating import GatedLM
    from ppn_bayes.lm import load_lm

    lm, _ = load_lm(smollm2_path)
    arch = describe(lm, mlp_group=64)
    generator = torch.Generator().manual_seed(0)
    ranking = Ranking.from_log_lambda(arch, torch.randn(arch.n_layers, generator=generator),
                                      torch.randn(arch.n_layers, arch.n_units, generator=generator))
    input_ids = torch.randint(0, lm.config.vocab_size, (1, 48), generator=generator)
    masks = ranking.masks(0.5)
    sub = build_subnetwork(lm, masks)
    gated = GatedLM(lm, arch)
    with torch.no_grad():
        reference = gated(input_ids, gates=masks.gates())
        sliced = sub(input_ids=input_ids).logits
    gated.unload()
    torch.testing.assert_close(sliced, reference, atol=1e-3, rtol=1e-3)  # fp32 sums over 30 layers
    assert decoder_params(sub) == held_params(sub, masks) <= masks.kept_params  # less any idle layer's norms
    result = resize(export_ranked(lm, tmp_path / "ranked", ranking=ranking), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(result.lm(input_ids=input_ids).logits, sliced, atol=1e-3, rtol=1e-3)
    assert result.bytes_read < 0.65 * result.checkpoint_bytes
