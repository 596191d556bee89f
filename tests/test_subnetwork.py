"""The sliced sub-network against the masked-dense reference (GatedLM under hard gates)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, expected_params, idle_layers_of, tiny_lm

from ppn_bayes.core.architecture import describe
from ppn_bayes.core.gating import GatedLM
from ppn_bayes.core.ranking import Masks, Ranking
from ppn_bayes.deploy.subnetwork import (
    EmptyAttention,
    EmptyMLP,
    build_subnetwork,
    decoder_params,
    held_params,
    load_subnetwork,
    save_subnetwork,
    subnetwork_widths,
)

# Two threads on this shared 2-core machine run tiny matmuls ~100x slower than one.
torch.set_num_threads(1)

TOKENS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
ATOL = 1e-5


def _arch(lm):
    return describe(lm, mlp_group=32)


def _reference_logits(lm, masks, input_ids=TOKENS):
    gated = GatedLM(lm, masks.arch)
    try:
        with torch.no_grad():
            return gated(input_ids, gates=masks.gates())
    finally:
        gated.unload()


def _logits(sub, input_ids=TOKENS):
    with torch.no_grad():
        return sub(input_ids=input_ids).logits


def _hand_masks(arch, layer, unit) -> Masks:
    """Masks from explicit boolean tensors, with their true cost."""
    layer_cost, unit_cost = arch.costs(dtype=torch.int64)
    kept = int(layer_cost[layer].sum() + unit_cost[unit].sum())
    return Masks(arch, layer, unit, kept / arch.total_cost, kept, arch.total_cost)


def _rankings(arch):
    generator = torch.Generator().manual_seed(3)
    log_layer = torch.randn(arch.n_layers, generator=generator)
    log_unit = 1.5 * torch.randn(arch.n_layers, arch.n_units, generator=generator)
    return [Ranking.from_log_lambda(arch, log_layer, log_unit), Ranking.random(arch, seed=5)]


def _check_masks_at(ranking: Ranking, sizes):
    """Nesting, budget and 'short by less than the next item' at every size; returns masks."""
    previous = None
    masks_list = []
    for size in sizes:
        masks = ranking.masks(size)
        budget = int(size * ranking.total_params)
        k = ranking.prefix_length(budget)
        assert masks.kept_params <= budget
        assert masks.kept_params == int(ranking.cost[:k].sum())
        if k < len(ranking.cost):
            assert budget - masks.kept_params < int(ranking.cost[k])
        assert not (masks.unit & ~masks.layer[:, None]).any(), "a unit kept in a dropped layer"
        if previous is not None:
            assert previous <= masks
        previous = masks
        masks_list.append(masks)
    return masks_list


def test_twenty_sizes_match_the_masked_reference(family):
    lm = tiny_lm(family)
    arch = _arch(lm)
    total_before = {k: v.clone() for k, v in lm.state_dict().items()}
    empty_seen = 0
    for ranking in _rankings(arch):
        smallest = float(ranking.cost[0]) / ranking.total_params
        sizes = torch.linspace(smallest * 1.001, 1.0, 20).tolist()
        for masks in _check_masks_at(ranking, sizes):
            sub = build_subnetwork(lm, masks)
            torch.testing.assert_close(_logits(sub), _reference_logits(lm, masks), atol=ATOL, rtol=1e-5)
            n_all = sum(p.numel() for p in sub.parameters())
            assert decoder_params(sub) == expected_params(lm, masks) == held_params(sub, masks)
            assert n_all - decoder_params(sub) == arch.outside_cost
            widths = subnetwork_widths(sub)
            kept = masks.layer.nonzero().flatten().tolist()
            assert list(widths.source_layers) == [l for l in kept if l not in idle_layers_of(lm, masks)]
            assert sub.config.num_hidden_layers == len(widths.source_layers)
            empty_seen += sum(not masks.unit[l].any() for l in kept)
    assert empty_seen, "no size of these rankings kept a layer with no unit: the case above went untested"
    for key, value in lm.state_dict().items():  # the input LM is untouched
        assert torch.equal(value, total_before[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_with_no_attention_or_no_mlp_units(family):
    lm = tiny_lm(family, seed=1)
    arch = _arch(lm)
    A = arch.n_attention_units
    layer = torch.ones(arch.n_layers, dtype=torch.bool)
    unit = torch.ones(arch.n_layers, arch.n_units, dtype=torch.bool)
    unit[0, :A] = False  # layer 0: no attention unit
    unit[1, A:] = False  # layer 1: no MLP unit
    unit[2, 0] = False
    unit[2, A + 1] = False
    masks = _hand_masks(arch, layer, unit)
    sub = build_subnetwork(lm, masks)
    layers = sub.transformer.h if family == "gpt2" else sub.model.layers
    attn0 = layers[0].attn if family == "gpt2" else layers[0].self_attn
    assert isinstance(attn0, EmptyAttention)
    assert isinstance(layers[1].mlp, EmptyMLP)
    torch.testing.assert_close(_logits(sub), _reference_logits(lm, masks), atol=ATOL, rtol=1e-5)
    assert decoder_params(sub) == masks.kept_params
    # Caches still count every position: greedy generation equals the reference.
    _assert_greedy_matches(lm, sub, masks)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_kept_layer_with_no_unit_is_left_out_where_it_adds_nothing(family):
    """Layer 1 kept with no unit: the identity where its output projections have no bias (left
    out, the same logits and greedy tokens through two layers), GPT-2's biases where they have
    (kept, as EmptyAttention and EmptyMLP). Every kept layer empty: the first one stays."""
    lm = tiny_lm(family, seed=6)
    arch = _arch(lm)
    layer = torch.ones(arch.n_layers, dtype=torch.bool)
    unit = torch.ones(arch.n_layers, arch.n_units, dtype=torch.bool)
    unit[1] = False
    masks = _hand_masks(arch, layer, unit)
    sub = build_subnetwork(lm, masks)
    layer_cost, _ = arch.costs(dtype=torch.int64)
    if family == "gpt2":
        assert subnetwork_widths(sub).source_layers == (0, 1, 2)
        assert decoder_params(sub) == masks.kept_params
    else:
        assert subnetwork_widths(sub).source_layers == (0, 2)
        assert decoder_params(sub) == masks.kept_params - int(layer_cost[1])
    torch.testing.assert_close(_logits(sub), _reference_logits(lm, masks), atol=ATOL, rtol=1e-5)
    _assert_greedy_matches(lm, sub, masks)

    assert held_params(sub, masks) == decoder_params(sub)
    other = _hand_masks(arch, layer, torch.ones_like(unit))  # masks it was not built from
    with pytest.raises(RuntimeError, match="leaves out layers \\[1\\], which keep units" if family != "gpt2"
                       else "decoder parameters, its masks"):
        held_params(sub, other)

    empty = _hand_masks(arch, layer, torch.zeros_like(unit))
    sub = build_subnetwork(lm, empty)
    assert subnetwork_widths(sub).source_layers == ((0, 1, 2) if family == "gpt2" else (0,))
    torch.testing.assert_close(_logits(sub), _reference_logits(lm, empty), atol=ATOL, rtol=1e-5)


def _greedy_reference(lm, masks, prompt, steps):
    ids = prompt
    for _ in range(steps):
        logits = _reference_logits(lm, masks, ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _assert_greedy_matches(lm, sub, masks, steps=6, **generate_kwargs):
    prompt = TOKENS[:1, :5]
    expected = _greedy_reference(lm, masks, prompt, steps)
    got = sub.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       pad_token_id=0, **generate_kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_greedy_generation_with_dynamic_and_static_cache(family):
    lm = tiny_lm(family, seed=2)
    arch = _arch(lm)
    ranking = Ranking.random(arch, seed=1)
    masks = ranking.masks(0.55)
    sub = build_subnetwork(lm, masks)
    _assert_greedy_matches(lm, sub, masks)
    _assert_greedy_matches(lm, sub, masks, cache_implementation="static")


def test_compiled_logits_equal_eager():
    lm = tiny_lm("llama", seed=3)
    arch = _arch(lm)
    A = arch.n_attention_units
    layer = torch.tensor([True, False, True])
    unit = torch.zeros(arch.n_layers, arch.n_units, dtype=torch.bool)
    unit[0, :A] = True
    unit[0, A] = True
    unit[2, A:] = True  # layer 2 keeps no attention unit
    sub = build_subnetwork(lm, _hand_masks(arch, layer, unit))
    # aot_eager traces the whole graph (dynamo + AOT autograd) without C++ codegen, which is
    # slow on a shared CPU; test_compiled_with_inductor runs the default backend (slow).
    compiled = torch.compile(sub, backend="aot_eager")
    torch.testing.assert_close(_logits(compiled), _logits(sub), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_compiled_with_inductor():
    lm = tiny_lm("llama", seed=3)
    masks = Ranking.random(_arch(lm), seed=2).masks(0.5)
    sub = build_subnetwork(lm, masks)
    compiled = torch.compile(sub)
    torch.testing.assert_close(_logits(compiled), _logits(sub), atol=1e-5, rtol=1e-5)


def test_uniform_widths_load_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    for family in ("llama", "qwen3", "gpt2"):
        lm = tiny_lm(family, seed=4)
        arch = _arch(lm)
        A = arch.n_attention_units
        layer = torch.tensor([True, False, True])
        unit = torch.zeros(arch.n_layers, arch.n_units, dtype=torch.bool)
        unit[[0, 2], A + 1] = True  # one MLP unit per kept layer, not the first
        unit[[0, 2], A + 3] = True
        if family == "gpt2":
            unit[[0, 2], :A] = True  # GPT-2's config can only say "all heads"
        else:
            unit[0, 1] = True  # one attention unit (not the same one) per kept layer
            unit[2, 0] = True
        masks = _hand_masks(arch, layer, unit)
        sub = build_subnetwork(lm, masks)
        assert subnetwork_widths(sub).uniform
        out = save_subnetwork(sub, None, tmp_path / family)
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(_logits(plain), _reference_logits(lm, masks), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(_logits(load_subnetwork(out)), _logits(sub), atol=ATOL, rtol=1e-5)


def test_uneven_widths_load_with_load_subnetwork(tmp_path, family):
    lm = tiny_lm(family, seed=5)
    arch = _arch(lm)
    A = arch.n_attention_units
    layer = torch.tensor([True, True, True])
    unit = torch.ones(arch.n_layers, arch.n_units, dtype=torch.bool)
    unit[0, :A] = False
    unit[1, A:A + 2] = False
    unit[2, A:] = False
    masks = _hand_masks(arch, layer, unit)
    sub = build_subnetwork(lm, masks)
    assert not subnetwork_widths(sub).uniform
    out = save_subnetwork(sub, None, tmp_path / "sub")
    loaded = load_subnetwork(out)
    torch.testing.assert_close(_logits(loaded), _reference_logits(lm, masks), atol=ATOL, rtol=1e-5)
    assert decoder_params(loaded) == expected_params(lm, masks)
    _assert_greedy_matches(lm, loaded, masks, steps=3)


def test_save_refuses_an_existing_directory_unless_overwrite(tmp_path):
    lm = tiny_lm("llama")
    sub = build_subnetwork(lm, Ranking.random(_arch(lm)).masks(0.5))
    out = tmp_path / "sub"
    save_subnetwork(sub, None, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_subnetwork(sub, None, out)
    save_subnetwork(sub, None, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no temporary left behind
    with pytest.raises(ValueError, match="not a ppn_bayes sub-network"):
        save_subnetwork(lm, None, tmp_path / "full")


def test_load_subnetwork_refuses_a_damaged_directory(tmp_path):
    from safetensors.torch import load_file, save_file

    from ppn_bayes.io import FileFormatError

    lm = tiny_lm("llama")
    sub = build_subnetwork(lm, Ranking.random(_arch(lm), seed=3).masks(0.6))
    out = save_subnetwork(sub, None, tmp_path / "sub")
    tensors = load_file(out / "model.safetensors")
    name = next(k for k in tensors if "o_proj" in k)
    del tensors[name]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(FileFormatError, match="lacks"):
        load_subnetwork(out)
    (out / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(FileFormatError):
        load_subnetwork(out)


def test_masks_for_another_model_or_inconsistent_are_refused():
    lm = tiny_lm("llama")
    other = tiny_lm("llama", num_hidden_layers=4)
    masks = Ranking.random(_arch(other)).masks(0.5)
    with pytest.raises(ValueError, match="another model"):
        build_subnetwork(lm, masks)
    arch = _arch(lm)
    layer = torch.tensor([True, False, True])
    unit = torch.ones(arch.n_layers, arch.n_units, dtype=torch.bool)
    with pytest.raises(ValueError, match="dropped layers"):
        build_subnetwork(lm, _hand_masks(arch, layer, unit))


def test_gpt2_layer_scaled_attention_keeps_its_base_layer_scale(tmp_path):
    """GPT-2 can scale attention by 1/(layer index + 1): a kept layer keeps its base index's scale."""
    lm = tiny_lm("gpt2", seed=6, scale_attn_by_inverse_layer_idx=True)
    arch = _arch(lm)
    layer = torch.tensor([False, True, True])
    unit = torch.zeros(arch.n_layers, arch.n_units, dtype=torch.bool)
    unit[1:, :] = True
    masks = _hand_masks(arch, layer, unit)
    sub = build_subnetwork(lm, masks)
    torch.testing.assert_close(_logits(sub), _reference_logits(lm, masks), atol=ATOL, rtol=1e-5)
    assert subnetwork_widths(sub).uniform
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(save_subnetwork(sub, None, tmp_path / "sub")).eval()
    torch.testing.assert_close(_logits(plain), _logits(sub), atol=ATOL, rtol=1e-5)


# -- one builder, three tensor sources ----------------------------------------------------------
def _tensors(lm) -> dict:
    """Every parameter and buffer (persistent or not, tied names included) by name."""
    return dict(list(lm.named_parameters(remove_duplicate=False)) + list(lm.named_buffers(remove_duplicate=False)))


def _assert_identical(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def _check_the_three_sources(lm, ranking, folder, sizes) -> tuple[int, int]:
    """Build ``ranking``'s masks at ``sizes`` through the three tensor sources and compare
    every tensor exactly; returns how many sizes re-index layers and empty some layer."""
    from ppn_bayes.decode.speculative import rank_sorted, shared_draft
    from ppn_bayes.deploy.resize import export_ranked, open_ranked, resize
    from ppn_bayes.deploy.subnetwork import LMTensors, idle_layers, selection_from_masks, tensor_plan

    checkpoint = open_ranked(export_ranked(lm, folder / "ranked", ranking=ranking))
    sorted_lm, ranked = rank_sorted(lm, ranking)  # the LM the ranked file stores, in memory
    assert checkpoint.ranking.to_dict() == ranked.to_dict()
    scaled = getattr(lm.config, "scale_attn_by_inverse_layer_idx", False)
    full = _tensors(sorted_lm)
    reindexed = emptied = 0
    for size in sizes:
        masks = ranked.masks(size)
        selection = selection_from_masks(masks)
        reindexed += selection.layers != tuple(range(len(selection.layers)))
        emptied += any(not units for units in selection.attention + selection.mlp)
        in_memory = build_subnetwork(sorted_lm, masks)
        expected = _tensors(in_memory)
        _assert_identical(_tensors(resize(checkpoint, size).lm), expected)
        if scaled:  # views cannot be rescaled: the builder refuses them
            with pytest.raises(ValueError, match="rescales its kept layers' weights"):
                shared_draft(sorted_lm, ranked, size)
            continue
        views = shared_draft(sorted_lm, ranked, size)
        got = _tensors(views)
        _assert_identical(got, expected)
        assert views.config.ppn_widths == in_memory.config.ppn_widths
        assert not any(p.requires_grad for p in views.parameters())
        # A rank-sorted LM keeps prefixes, so every non-empty tensor of the views is a view
        # of its full tensor; GPT-2's fused q|k|v is no prefix when some attention units go.
        names = [name for name, _ in views.named_parameters(remove_duplicate=False)]
        built = selection.without(idle_layers(LMTensors(sorted_lm), ranked.arch, selection))  # the layers it holds
        for name, take in tensor_plan(ranked.arch, built, names).items():
            if got[name].numel() == 0:
                continue
            shares = got[name].untyped_storage().data_ptr() == full[take.source].untyped_storage().data_ptr()
            assert shares != ("c_attn" in name and got[name].numel() < full[take.source].numel()), name
    return reindexed, emptied


@pytest.mark.parametrize("family,overrides", [("llama", {"tie_word_embeddings": True}), ("qwen3", {}),
                                              ("gpt2", {}), ("gpt2", {"scale_attn_by_inverse_layer_idx": True})])
def test_the_three_tensor_sources_build_identical_sub_networks(tmp_path, family, overrides):
    """The same masks through the LM in memory (copies), the ranked file (slices read from
    disk) and views of the LM (shared storage) give the same tensors, bit for bit."""
    lm = tiny_lm(family, **overrides)
    reindexed, emptied = _check_the_three_sources(lm, Ranking.random(_arch(lm), seed=4), tmp_path,
                                                  (0.1, 0.25, 0.55, 1.0))
    assert reindexed and emptied  # the sizes cover dropped layers and layers with no units of a kind


@pytest.mark.slow
def test_the_three_tensor_sources_agree_on_smollm2(smollm2_path, tmp_path):
    """The same on the real model (SmolLM2-135M), at two sizes."""
    from ppn_bayes.lm import load_lm

    lm, _ = load_lm(smollm2_path)
    _check_the_three_sources(lm, Ranking.random(describe(lm, mlp_group=64), seed=4), tmp_path, (0.3, 0.7))
