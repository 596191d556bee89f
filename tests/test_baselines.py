"""Structured baselines (ShortGPT, magnitude, activation norm) and the llm-compressor wrapper."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import FAMILIES, tiny_lm
from hypothesis import given, settings
from hypothesis import strategies as st

from ppn_bayes.core.architecture import Architecture, decoder_layers, describe, family_of, get_module
from ppn_bayes.inspect.baselines import (
    activation_column_scores,
    activation_scores,
    block_influence,
    calibration_windows,
    decoder_density,
    magnitude_ranking,
    magnitude_scores,
    order_mlp_channels,
    ranking_from_scores,
    shortgpt_ranking,
    uniform_cut,
    uniform_cut_for_size,
    uniform_ranking_from_scores,
    uniform_widths,
    unit_scores_from_columns,
    sparse_prune,
)
from ppn_bayes.data import CharTokenizer

G = 32  # MLP units of 32 channels: 4 per tiny layer


def _windows(n=3, T=16, seed=0):
    return torch.randint(0, 97, (n, T), generator=torch.Generator().manual_seed(seed))


def _out_in(module, conv1d):
    return module.weight.detach().t() if conv1d else module.weight.detach()


def _unit_slices(lm, arch, index):
    """Slow reference: for every unit, the list of weight blocks (out x in views) it owns."""
    family = family_of(lm)
    layer = decoder_layers(lm)[index]
    hd, hpu, g, H = arch.head_dim, arch.heads_per_unit, arch.mlp_group, arch.n_heads
    owned = []
    for a in range(arch.n_attention_units):
        blocks = []
        if family.fused_qkv:
            w = _out_in(get_module(layer, family.q), family.conv1d)
            blocks += [("qkv", w[a * hpu * hd:(a + 1) * hpu * hd], "rows", a * hpu * hd),
                       ("qkv", w[H * hd + a * hd:H * hd + (a + 1) * hd], "rows", None),
                       ("qkv", w[2 * H * hd + a * hd:2 * H * hd + (a + 1) * hd], "rows", None)]
        else:
            blocks += [(family.q, _out_in(get_module(layer, family.q), False)[a * hpu * hd:(a + 1) * hpu * hd],
                        "rows", None)]
            for path in (family.k, family.v):
                blocks.append((path, _out_in(get_module(layer, path), False)[a * hd:(a + 1) * hd], "rows", None))
        o = _out_in(get_module(layer, family.o), family.conv1d)
        blocks.append((family.o, o[:, a * hpu * hd:(a + 1) * hpu * hd], "cols", a * hpu * hd))
        owned.append(blocks)
    for m in range(arch.n_mlp_units):
        blocks = [(p, _out_in(get_module(layer, p), family.conv1d)[m * g:(m + 1) * g], "rows", None)
                  for p in family.mlp_in]
        down = _out_in(get_module(layer, family.mlp_out), family.conv1d)
        blocks.append((family.mlp_out, down[:, m * g:(m + 1) * g], "cols", m * g))
        owned.append(blocks)
    return owned


def _zero_unit(lm, arch, index, unit):
    """Zero every weight ``unit`` of layer ``index`` owns (through the reference slices)."""
    with torch.no_grad():
        for _, block, _, _ in _unit_slices(lm, arch, index)[unit]:
            block.zero_()


# -- calibration windows ---------------------------------------------------------------------
def test_calibration_windows_are_distinct_aligned_and_seeded():
    tokens = torch.arange(1000)
    w = calibration_windows(tokens, 5, 100, seed=0)
    assert w.shape == (5, 100)
    starts = w[:, 0]
    assert len(set(starts.tolist())) == 5 and all(s % 100 == 0 for s in starts.tolist())
    assert torch.equal(w, w[:, :1] + torch.arange(100))  # contiguous windows of the stream
    assert torch.equal(w, calibration_windows(tokens, 5, 100, seed=0))
    assert not torch.equal(w, calibration_windows(tokens, 5, 100, seed=1))
    with pytest.raises(ValueError, match="calibration windows"):
        calibration_windows(tokens, 11, 100)


# -- ShortGPT --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_block_influence_matches_hidden_states(family):
    lm = tiny_lm(family)
    x = _windows()
    bi = block_influence(lm, x, batch_size=2)
    hs = lm(input_ids=x, output_hidden_states=True).hidden_states
    # hidden_states[-1] may be after the final norm: compare every layer but the last.
    for i in range(len(hs) - 2):
        ref = 1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).double().mean()
        assert bi[i].item() == pytest.approx(ref.item(), abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_identity_layer_goes_first(family):
    lm = tiny_lm(family)
    arch = describe(lm, mlp_group=G)
    fam = family_of(lm)
    layer = decoder_layers(lm)[1]
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: an exact identity
        for path in (fam.o, fam.mlp_out):
            module = get_module(layer, path)
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
    bi = block_influence(lm, _windows())
    assert bi[1].item() == pytest.approx(0.0, abs=1e-6)
    assert bi[0] > 1e-3 and bi[2] > 1e-3
    ranking = shortgpt_ranking(arch, bi)
    layer_cost, unit_cost = arch.costs(dtype=torch.int64)
    without = arch.total_cost - int(layer_cost[1] + unit_cost[1].sum())
    masks = ranking.masks_for_params(without)
    assert masks.layer.tolist() == [True, False, True]
    assert masks.unit[[0, 2]].all() and not masks.unit[1].any()
    assert masks.kept_params == without


def test_shortgpt_ranking_keeps_whole_layers_in_influence_order():
    lm = tiny_lm("llama", num_hidden_layers=4)
    arch = describe(lm, mlp_group=G)
    ranking = shortgpt_ranking(arch, torch.tensor([0.3, 0.1, 0.4, 0.2]))
    layers_in_order = ranking.items[:, 0].tolist()
    blocks = [layers_in_order[i] for i in range(0, len(layers_in_order), 1 + arch.n_units)]
    assert blocks == [2, 0, 3, 1]
    for start in range(0, len(layers_in_order), 1 + arch.n_units):  # a layer, then its own units
        chunk = ranking.items[start:start + 1 + arch.n_units]
        assert chunk[0, 1] == -1 and (chunk[:, 0] == chunk[0, 0]).all()
        assert chunk[1:, 1].tolist() == list(range(arch.n_units))
    with pytest.raises(ValueError, match="block influence"):
        shortgpt_ranking(arch, torch.zeros(3))


# -- magnitude and activation scores -----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_magnitude_scores_match_slow_reference(family):
    lm = tiny_lm(family)
    arch = describe(lm, mlp_group=G)
    scores = magnitude_scores(lm, arch)
    assert scores.shape == (arch.n_layers, arch.n_units)
    for index in range(arch.n_layers):
        for unit, blocks in enumerate(_unit_slices(lm, arch, index)):
            total = sum(float((b.double() ** 2).sum()) for _, b, _, _ in blocks)
            count = sum(b.numel() for _, b, _, _ in blocks)
            assert scores[index, unit].item() == pytest.approx(total / count, rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_scores_match_slow_reference(family):
    lm = tiny_lm(family)
    arch = describe(lm, mlp_group=G)
    fam = family_of(lm)
    x = _windows()
    scores = activation_scores(lm, arch, x, batch_size=2)
    captured = {}
    handles = []
    for index, layer in enumerate(decoder_layers(lm)):
        for path in (fam.o, fam.mlp_out):
            def hook(module, args, key=(index, path)):
                captured[key] = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [B*T, in]
            handles.append(get_module(layer, path).register_forward_pre_hook(hook))
    lm(input_ids=x)  # one batch holds every window
    for h in handles:
        h.remove()
    width = arch.heads_per_unit * arch.head_dim
    for index in range(arch.n_layers):
        heads = captured[(index, fam.o)]  # [tokens, H hd]: the query heads' outputs
        channels = captured[(index, fam.mlp_out)]  # [tokens, I]
        for unit in range(arch.n_attention_units):
            output = heads[:, unit * width:(unit + 1) * width]
            assert scores[index, unit].item() == pytest.approx(float(output.pow(2).sum(1).mean()), rel=1e-5)
        for unit in range(arch.n_mlp_units):
            block = channels[:, unit * G:(unit + 1) * G]
            expected = float(block.abs().mean(0).sum())
            assert scores[index, arch.n_attention_units + unit].item() == pytest.approx(expected, rel=1e-5)


def test_activation_scores_follow_the_units_outputs_not_their_weights():
    """Issue 15's regression: a KV group whose v rows are scaled up (its heads' outputs
    grow) while its q and k rows shrink ranks first by activation. The old score averaged
    the Wanda score over every weight the unit owns, q/k/v rows included (there it is
    their magnitude), and ranked that group last."""
    lm = tiny_lm("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    arch = describe(lm, mlp_group=G)
    hd, hpu = arch.head_dim, arch.heads_per_unit
    with torch.no_grad():
        attention = lm.model.layers[1].self_attn
        attention.v_proj.weight[hd:2 * hd] *= 3  # group 1 outputs three times as much
        attention.q_proj.weight[hpu * hd:2 * hpu * hd] *= 0.01
        attention.k_proj.weight[hd:2 * hd] *= 0.01
    scores = activation_scores(lm, arch, _windows())
    assert scores[1, :arch.n_attention_units].argmax().item() == 1
    masks = uniform_cut(arch, scores, 1, arch.n_mlp_units)
    assert masks.unit[1, :arch.n_attention_units].tolist() == [False, True, False]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_order_mlp_channels_keeps_the_function_and_sorts_the_scores(family):
    lm = tiny_lm(family)
    x = _windows()
    before = lm(input_ids=x).logits
    _, mlp = activation_column_scores(lm, x)
    ordered = order_mlp_channels(lm, mlp)
    assert torch.allclose(lm(input_ids=x).logits, before, atol=1e-5)  # only the summation order moved
    assert torch.equal(ordered, mlp.sort(dim=1, descending=True).values)
    _, again = activation_column_scores(lm, x)  # scored again in the new order: descending
    assert torch.allclose(again, ordered, rtol=1e-5)
    with pytest.raises(ValueError, match="channel scores"):
        order_mlp_channels(lm, mlp[:1])


def test_uniform_activation_cut_matches_a_slow_reference():
    """The pipeline (column scores, channels ordered, unit scores, uniform cut, sliced
    sub-network) against the obvious masked-dense cut: in every layer, keep the KV group
    whose heads' outputs have the largest mean squared norm and the ``m · g`` single
    channels of largest mean absolute activation, zero the rest of the output projections'
    columns."""
    import copy

    from ppn_bayes.deploy.subnetwork import build_subnetwork

    lm = tiny_lm("llama", intermediate_size=128)
    arch = describe(lm, mlp_group=16)
    x = _windows(4, 24)
    a, m = 1, 3
    ordered = copy.deepcopy(lm)
    attention, mlp = activation_column_scores(lm, x, batch_size=3)
    scores = unit_scores_from_columns(arch, attention, order_mlp_channels(ordered, mlp))
    sub = build_subnetwork(ordered, uniform_cut(arch, scores, a, m))

    captured = {}
    handles = [module.register_forward_pre_hook(
        lambda module, args, key=(index, name): captured.__setitem__(key, args[0].reshape(-1, args[0].shape[-1])))
        for index, layer in enumerate(lm.model.layers)
        for name, module in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj))]
    lm(input_ids=x)
    for h in handles:
        h.remove()
    reference = copy.deepcopy(lm)
    width = arch.heads_per_unit * arch.head_dim
    with torch.no_grad():
        for index, layer in enumerate(reference.model.layers):
            o, down = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
            heads, h = captured[(index, "o")].double(), captured[(index, "down")].double()
            group = [float(heads[:, k * width:(k + 1) * width].pow(2).sum(1).mean())
                     for k in range(arch.n_attention_units)]
            channel = [float(h[:, j].abs().mean()) for j in range(h.shape[1])]
            best = max(range(len(group)), key=group.__getitem__)
            for k in range(arch.n_attention_units):
                if k != best:
                    o[:, k * width:(k + 1) * width] = 0
            kept = sorted(range(len(channel)), key=lambda j: -channel[j])[:m * arch.mlp_group]
            dropped = [j for j in range(len(channel)) if j not in kept]
            down[:, dropped] = 0
    assert torch.allclose(sub(input_ids=x).logits, reference(input_ids=x).logits, atol=1e-5)


@pytest.mark.parametrize("scorer", ["magnitude", "activation"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zeroed_units_rank_last(family, scorer):
    lm = tiny_lm(family)
    arch = describe(lm, mlp_group=G)
    dead = [(0, 1), (2, arch.n_attention_units + 2), (1, 0)]
    for index, unit in dead:
        _zero_unit(lm, arch, index, unit)
    scores = magnitude_scores(lm, arch) if scorer == "magnitude" else activation_scores(lm, arch, _windows())
    ranking = ranking_from_scores(arch, scores)
    last = {tuple(item) for item in ranking.items[-len(dead):].tolist()}
    assert last == set(dead)
    assert all(scores[i, u] == 0 for i, u in dead)


def test_magnitude_ranking_builds_its_own_architecture():
    lm = tiny_lm("llama")
    assert torch.equal(magnitude_ranking(lm, mlp_group=G).items,
                       ranking_from_scores(describe(lm, mlp_group=G), magnitude_scores(lm, describe(lm, mlp_group=G))).items)


def _arch(L: int, A: int, M: int, layer_cost, unit_cost) -> Architecture:
    return Architecture(family="llama", model_type="llama", n_layers=L, hidden_size=8, n_heads=A, n_kv_heads=A,
                        head_dim=8, intermediate_size=8 * M, mlp_group=8, n_attention_units=A, n_mlp_units=M,
                        layer_cost=tuple(layer_cost), unit_cost=tuple(tuple(row) for row in unit_cost),
                        outside_cost=0)


@settings(max_examples=60, deadline=None)
@given(L=st.integers(1, 4), A=st.integers(1, 3), M=st.integers(0, 3), data=st.data())
def test_ranking_from_scores_respects_hierarchy(L, A, M, data):
    U = A + M
    costs = st.integers(1, 50)
    arch = _arch(L, A, M, data.draw(st.lists(costs, min_size=L, max_size=L)),
                 [data.draw(st.lists(costs, min_size=U, max_size=U)) for _ in range(L)])
    # few distinct values: ties between units, layers and both are frequent
    values = data.draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, 3.5]) | st.floats(-5, 5),
                                min_size=L * U, max_size=L * U))
    scores = torch.tensor(values, dtype=torch.float64).view(L, U)
    ranking = ranking_from_scores(arch, scores)
    items = ranking.items.tolist()
    position = {tuple(item): k for k, item in enumerate(items)}
    assert len(position) == L * (1 + U)
    best = scores.max(dim=1).values  # [L]
    for layer in range(L):
        # the layer comes right before its best unit: only ties of that score lie between
        start, first_unit = position[(layer, -1)], min(position[(layer, u)] for u in range(U))
        assert start < first_unit
        for l, u in items[start + 1:first_unit]:
            assert (best[l] if u < 0 else scores[l, u]) == best[layer]
    unit_scores = [scores[l, u].item() for l, u in items if u >= 0]
    assert unit_scores == sorted(unit_scores, reverse=True)
    # every prefix respects the hierarchy, and masks are nested
    previous = None
    for k in range(1, len(items) + 1):
        masks = ranking.masks_for_params(int(ranking._cumulative[k - 1]))
        assert not (masks.unit & ~masks.layer[:, None]).any()
        if previous is not None:
            assert previous <= masks
        previous = masks


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 4), A=st.integers(1, 3), M=st.integers(1, 6), data=st.data())
def test_uniform_ranking_cuts_every_layer_alike(L, A, M, data):
    U = A + M
    arch = _arch(L, A, M, [1] * L, [[5] * A + [2] * M for _ in range(L)])
    scores = torch.tensor(data.draw(st.lists(st.floats(-5, 5), min_size=L * U, max_size=L * U)),
                          dtype=torch.float64).view(L, U) * torch.logspace(0, 3, L, dtype=torch.float64)[:, None]
    ranking = uniform_ranking_from_scores(arch, scores)
    for k in range(1, len(ranking.items) + 1):
        masks = ranking.masks_for_params(int(ranking._cumulative[k - 1]))
        assert not (masks.unit & ~masks.layer[:, None]).any()
        for group in (slice(0, A), slice(A, U)):
            kept = masks.unit[:, group]
            fraction = kept.sum(1).double() / kept.shape[1]  # [L]
            # every layer keeps the same share of the group, to within one unit
            assert fraction.max() - fraction.min() <= 1 / kept.shape[1] + 1e-12
            for layer in range(L):  # and what a layer keeps are its best-scoring units
                block = scores[layer, group]
                if kept[layer].any() and (~kept[layer]).any():
                    assert block[kept[layer]].min() >= block[~kept[layer]].max()


def test_ranking_from_scores_rejects_bad_scores():
    arch = describe(tiny_lm("llama"), mlp_group=G)
    with pytest.raises(ValueError, match="scores of shape"):
        ranking_from_scores(arch, torch.zeros(2, 2))
    bad = torch.zeros(arch.n_layers, arch.n_units)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        ranking_from_scores(arch, bad)


def test_decoder_density_counts_zeros_in_the_decoder_only():
    lm = tiny_lm("llama")
    arch = describe(lm, mlp_group=G)
    assert decoder_density(lm, arch) == 1.0
    with torch.no_grad():
        lm.model.embed_tokens.weight.zero_()  # outside the decoder: no change
        assert decoder_density(lm, arch) == 1.0
        w = lm.model.layers[0].mlp.up_proj.weight
        w.zero_()
    assert decoder_density(lm, arch) == pytest.approx(1 - w.numel() / arch.total_cost)


# -- llm-compressor ------------------------------------------------------------------------------
needs_llmcompressor = pytest.mark.skipif(importlib.util.find_spec("llmcompressor") is None,
                                         reason="llmcompressor is not installed")


def test_sparse_prune_rejects_bad_arguments():
    lm = tiny_lm("llama")
    tok = CharTokenizer("ab")
    with pytest.raises(ValueError, match="method"):
        sparse_prune(lm, tok, _windows(), method="magnitude")
    with pytest.raises(ValueError, match="sparsity"):
        sparse_prune(lm, tok, _windows(), method="wanda", sparsity=1.0)
    with pytest.raises(ValueError, match="2:4"):
        sparse_prune(lm, tok, _windows(), method="wanda", sparsity=0.6, mask_structure="2:4")
    with pytest.raises(ValueError, match="tokenizer"):
        sparse_prune(lm, None, _windows(), method="wanda")


@needs_llmcompressor
@pytest.mark.parametrize("method, sparsity, structure", [("sparsegpt", 0.6, "0:0"), ("wanda", 0.5, "2:4")])
def test_sparse_prune_through_llmcompressor(method, sparsity, structure):
    lm = tiny_lm("llama", hidden_size=64, intermediate_size=128)
    arch = describe(lm, mlp_group=G)
    embed = lm.model.embed_tokens.weight.detach().clone()
    tokens = torch.randint(0, 97, (2000,), generator=torch.Generator().manual_seed(0))
    pruned = sparse_prune(lm, CharTokenizer("ab"), calibration_windows(tokens, 4, 64), method=method,
                          sparsity=sparsity, mask_structure=structure, arch=arch)
    assert pruned.lm is lm
    norms = sum(p.numel() for layer in decoder_layers(lm) for n, p in layer.named_parameters() if "norm" in n)
    # every decoder linear layer is pruned to the sparsity; the norms stay dense
    assert pruned.size_reached == pytest.approx(1 - sparsity + sparsity * norms / arch.total_cost, abs=2e-3)
    for layer in decoder_layers(lm):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                assert (module.weight == 0).float().mean().item() == pytest.approx(sparsity, abs=0.02)
                if structure == "2:4":
                    groups = module.weight.view(module.weight.shape[0], -1, 4)
                    assert ((groups != 0).sum(-1) <= 2).all()
    assert torch.equal(lm.model.embed_tokens.weight, embed)  # the embeddings (and tied head) stay
    assert all(type(m._parameters) is dict for m in lm.modules())  # no offloading wrapper is left
    logits = lm(input_ids=_windows(1)).logits
    assert torch.isfinite(logits).all()


# -- the uniform width cut -----------------------------------------------------------------------
def _uniform_arch(data, L, A, M) -> Architecture:
    """Costs as describe() makes them: the same for every unit of a kind within a layer."""
    costs = st.integers(1, 60)
    rows = []
    for _ in range(L):
        attention, mlp = data.draw(costs), data.draw(costs)
        rows.append([attention] * A + [mlp] * M)
    return _arch(L, A, M, data.draw(st.lists(costs, min_size=L, max_size=L)), rows)


@settings(max_examples=80, deadline=None)
@given(L=st.integers(1, 4), A=st.integers(1, 4), M=st.integers(1, 6), size=st.floats(0.01, 1.0), data=st.data())
def test_uniform_widths_reach_the_closest_size_not_above(L, A, M, size, data):
    arch = _uniform_arch(data, L, A, M)
    scores = torch.zeros(L, A + M)
    budget = int(size * arch.total_cost)
    # slow reference: every shape, its cost from the masks of that cut
    costs = {(a, m): uniform_cut(arch, scores, a, m).kept_params for a in range(1, A + 1) for m in range(1, M + 1)}
    fitting = {shape: cost for shape, cost in costs.items() if cost <= budget}
    if not fitting:
        with pytest.raises(ValueError, match="smallest uniform cut"):
            uniform_widths(arch, size)
        return
    a, m = uniform_widths(arch, size)
    assert costs[(a, m)] == max(fitting.values())
    masks = uniform_cut_for_size(arch, scores, size)
    assert masks.kept_params == costs[(a, m)] <= budget and masks.size_requested == size
    assert masks.layer.all() and (masks.unit[:, :A].sum(1) == a).all() and (masks.unit[:, A:].sum(1) == m).all()


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 4), A=st.integers(1, 4), M=st.integers(1, 6), data=st.data())
def test_uniform_cut_keeps_each_layers_best_units(L, A, M, data):
    arch = _arch(L, A, M, [1] * L, [[5] * A + [2] * M for _ in range(L)])
    # distinct scores on scales that differ by layer: only within-layer order may count
    order = torch.randperm(L * (A + M), generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    scores = order.double().view(L, A + M) * torch.logspace(0, 3, L, dtype=torch.float64)[:, None]
    a, m = data.draw(st.integers(1, A)), data.draw(st.integers(1, M))
    masks = uniform_cut(arch, scores, a, m)
    for layer in range(L):
        for group, keep in ((slice(0, A), a), (slice(A, A + M), m)):
            kept, block = masks.unit[layer, group], scores[layer, group]
            assert kept.sum() == keep
            if keep < block.numel():
                assert block[kept].min() > block[~kept].max()
    with pytest.raises(ValueError, match="uniform cut keeps"):
        uniform_cut(arch, scores, 0, m)
    with pytest.raises(ValueError, match="scores of shape"):
        uniform_cut(arch, scores[:, :1], a, m)


def test_uniform_cut_slices_to_the_masks_parameter_count():
    from ppn_bayes.deploy.subnetwork import build_subnetwork, decoder_params

    lm = tiny_lm("llama", intermediate_size=128)
    arch = describe(lm, mlp_group=16)  # 8 MLP units a layer
    masks = uniform_cut_for_size(arch, activation_scores(lm, arch, _windows()), 0.5)
    sub = build_subnetwork(lm, masks)
    assert decoder_params(sub) == masks.kept_params <= int(0.5 * arch.total_cost)
    widths = sub.config.ppn_widths
    assert len(set(widths["attention_units"])) == 1 and len(set(widths["mlp_units"])) == 1
