"""Architecture description, gating, the budget equation and the ranking."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import tiny_lm
from torch import nn

from ppn_bayes import GatedLM, Gates, Ranking, UnsupportedModelError, UntrainedSizeWarning, describe
from ppn_bayes.core.architecture import decoder_layers, family_of, get_module
from ppn_bayes.core.budget import Budget, expected_size, keep_probs, solve_log_tau


# -- architecture ----------------------------------------------------------------------------
def test_costs_add_up_to_the_decoder(family):
    lm = tiny_lm(family)
    arch = describe(lm, mlp_group=32)
    layer_params = sum(p.numel() for p in decoder_layers(lm).parameters())
    assert arch.total_cost == layer_params
    assert arch.outside_cost == sum(p.numel() for p in lm.parameters()) - layer_params
    assert arch.n_mlp_units == 128 // 32
    assert arch.n_attention_units == (4 if family == "gpt2" else 2)  # a head, or a kv group
    assert arch.heads_per_unit == (1 if family == "gpt2" else 2)


def test_attention_unit_cost_counts_its_rows_and_columns():
    lm = tiny_lm("qwen2")  # q/k/v biases
    arch = describe(lm, mlp_group=32)
    hidden, head_dim, heads_per_unit = 32, 8, 2
    q, kv = heads_per_unit * head_dim, head_dim
    expected = hidden * (q + 2 * kv) + (q + 2 * kv) + hidden * q
    assert arch.unit_cost[0][0] == expected
    assert arch.unit_cost[0][-1] == 3 * 32 * hidden  # gate rows, up rows, down columns


def test_architecture_round_trips_through_a_dict():
    arch = describe(tiny_lm("llama"), mlp_group=32)
    assert type(arch).from_dict(arch.to_dict()) == arch


def test_mlp_group_must_divide_the_intermediate_size():
    with pytest.raises(ValueError, match="mlp_group=48 must divide the intermediate size 128"):
        describe(tiny_lm("llama"), mlp_group=48)


def test_unknown_layouts_are_named():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32))
    with pytest.raises(UnsupportedModelError, match="model_type 'bert' is not supported"):
        describe(bert)
    with pytest.raises(UnsupportedModelError, match="no config.model_type"):
        describe(nn.Linear(2, 2))


def test_a_model_without_decoder_layers_is_refused():
    lm = tiny_lm("llama")
    lm.model.layers = nn.ModuleList()
    with pytest.raises(UnsupportedModelError, match="no decoder layers"):
        describe(lm)
    del lm.model.layers
    with pytest.raises(UnsupportedModelError, match="has no module 'model.layers'"):
        describe(lm)


# -- gating ------------------------------------------------------------------------------------
def test_all_gates_on_reproduce_the_logits_exactly(family):
    lm = tiny_lm(family)
    arch = describe(lm, mlp_group=32)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        base = lm(input_ids=x).logits
        gated = GatedLM(lm, arch)
        assert torch.equal(gated(x, gates=Gates.ones(arch)), base)
        assert torch.equal(gated(x), base)  # no gates: the LM untouched


def test_unload_restores_the_module_tree(family):
    lm = tiny_lm(family)
    before = {name: type(m) for name, m in lm.named_modules()}
    state = copy.deepcopy(lm.state_dict())
    gated = GatedLM(lm, describe(lm, mlp_group=32))
    assert gated.unload() is lm
    assert {name: type(m) for name, m in lm.named_modules()} == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.modules())
    assert all(torch.equal(state[k], v) for k, v in lm.state_dict().items())


def test_a_closed_layer_gate_removes_the_layer(family):
    lm = tiny_lm(family)
    arch = describe(lm, mlp_group=32)
    x = torch.randint(0, 97, (2, 12))
    gates = Gates.ones(arch)
    gates.layer[1] = 0.0
    with torch.no_grad():
        gated_logits = GatedLM(lm, arch)(x, gates=gates)
        # Reference: the same LM with layer 1 deleted.
        ref = copy.deepcopy(lm)
        layers = decoder_layers(ref)
        del layers[1]
        ref.config.num_hidden_layers = len(layers)
        if hasattr(ref.config, "layer_types") and ref.config.layer_types is not None:
            ref.config.layer_types = ref.config.layer_types[: len(layers)]
        expected = ref(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(gated_logits, expected, rtol=1e-5, atol=1e-5)


def test_a_closed_unit_gate_equals_zeroing_its_weights(family):
    lm = tiny_lm(family)
    arch = describe(lm, mlp_group=32)
    fam = family_of(lm)
    x = torch.randint(0, 97, (2, 12))
    gates = Gates.ones(arch)
    gates.unit[0, 1] = 0.0  # attention unit 1 of layer 0
    gates.unit[2, arch.n_attention_units + 2] = 0.0  # MLP unit 2 of layer 2
    width = arch.heads_per_unit * arch.head_dim
    with torch.no_grad():
        gated_logits = GatedLM(lm, arch)(x, gates=gates)
        ref = copy.deepcopy(lm)
        layers = decoder_layers(ref)
        o = get_module(layers[0], fam.o).weight
        down = get_module(layers[2], fam.mlp_out).weight
        if fam.conv1d:  # [in, out]
            o[width:2 * width, :] = 0
            down[64:96, :] = 0
        else:  # [out, in]
            o[:, width:2 * width] = 0
            down[:, 64:96] = 0
        expected = ref(input_ids=x).logits
    torch.testing.assert_close(gated_logits, expected, rtol=1e-5, atol=1e-5)


def test_gates_per_sequence_match_gates_per_batch():
    lm = tiny_lm("llama")
    arch = describe(lm, mlp_group=32)
    x = torch.randint(0, 97, (2, 12))
    torch.manual_seed(1)
    g0 = Gates(torch.rand(arch.n_layers), torch.rand(arch.n_layers, arch.n_units))
    g1 = Gates(torch.rand(arch.n_layers), torch.rand(arch.n_layers, arch.n_units))
    gated = GatedLM(lm, arch)
    with torch.no_grad():
        both = gated(x, gates=Gates(torch.stack([g0.layer, g1.layer]), torch.stack([g0.unit, g1.unit])))
        torch.testing.assert_close(both[:1], gated(x[:1], gates=g0))
        torch.testing.assert_close(both[1:], gated(x[1:], gates=g1))


def test_gates_of_the_wrong_shape_are_refused():
    lm = tiny_lm("llama")
    arch = describe(lm, mlp_group=32)
    with pytest.raises(ValueError, match="do not fit 3 layers x 6 units"):
        GatedLM(lm, arch)(torch.zeros(1, 4, dtype=torch.long), gates=Gates(torch.ones(2), torch.ones(2, 6)))


# -- the budget equation -----------------------------------------------------------------------
def _scales(L=5, U=7, seed=0, spread=1.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, generator=g, dtype=torch.float64) * spread,
            torch.randn(L, U, generator=g, dtype=torch.float64) * spread,
            torch.rand(L, generator=g, dtype=torch.float64) * 10 + 1,
            torch.rand(L, U, generator=g, dtype=torch.float64) * 100 + 1)


@pytest.mark.parametrize("size", [0.01, 0.1, 0.3, 0.5, 0.77, 0.99])
def test_the_root_meets_the_budget(size):
    ll, lu, cl, cu = _scales()
    log_tau = solve_log_tau(size, ll, lu, cl, cu)
    assert abs(float(expected_size(log_tau, ll, lu, cl, cu)) - size) < 1e-9


def test_keep_probabilities_rise_with_tau_and_units_stay_below_their_layer():
    ll, lu, _, _ = _scales()
    taus = torch.linspace(-6, 6, 50, dtype=torch.float64)
    layer, unit = keep_probs(taus, ll.expand(50, -1), lu.expand(50, -1, -1))
    assert (layer.diff(dim=0) >= 0).all() and (unit.diff(dim=0) >= 0).all()
    assert (unit <= layer[..., None]).all()


def test_sizes_outside_the_unit_interval_are_refused():
    ll, lu, cl, cu = _scales()
    for bad in (0.0, -0.1, 1.2):
        with pytest.raises(ValueError, match="size must lie in"):
            solve_log_tau(bad, ll, lu, cl, cu)


def test_the_implicit_gradient_matches_finite_differences():
    ll, lu, cl, cu = _scales(L=3, U=4)
    ll.requires_grad_(True)
    lu.requires_grad_(True)
    log_tau = solve_log_tau(0.4, ll, lu, cl, cu)
    grad_ll, grad_lu = torch.autograd.grad(log_tau, (ll, lu))
    eps = 1e-6
    for index in [(0,), (2,)]:
        bump = torch.zeros_like(ll)
        bump[index] = eps
        up = solve_log_tau(0.4, (ll + bump).detach(), lu.detach(), cl, cu)
        down = solve_log_tau(0.4, (ll - bump).detach(), lu.detach(), cl, cu)
        assert abs(float((up - down) / (2 * eps)) - float(grad_ll[index])) < 1e-5
    bump = torch.zeros_like(lu)
    bump[1, 2] = eps
    up = solve_log_tau(0.4, ll.detach(), (lu + bump).detach(), cl, cu)
    down = solve_log_tau(0.4, ll.detach(), (lu - bump).detach(), cl, cu)
    assert abs(float((up - down) / (2 * eps)) - float(grad_lu[1, 2])) < 1e-5


# -- ranking and masks -------------------------------------------------------------------------
def test_masks_are_nested_within_budget_and_respect_the_hierarchy(family):
    arch = describe(tiny_lm(family), mlp_group=32)
    g = torch.Generator().manual_seed(3)
    ranking = Ranking.from_log_lambda(arch, torch.randn(arch.n_layers, generator=g),
                                      torch.randn(arch.n_layers, arch.n_units, generator=g))
    previous = None
    for size in torch.linspace(0.05, 1.0, 20).tolist():
        masks = ranking.masks(size)
        budget = int(size * arch.total_cost)
        assert masks.kept_params <= budget
        k = ranking.prefix_length(budget)
        if k < len(ranking.cost):
            assert budget - masks.kept_params < int(ranking.cost[k])
        assert not (masks.unit & ~masks.layer[:, None]).any(), "a unit kept in a dropped layer"
        layer_cost, unit_cost = arch.costs(dtype=torch.int64)
        assert masks.kept_params == int((layer_cost * masks.layer).sum() + (unit_cost * masks.unit).sum())
        if previous is not None:
            assert previous <= masks
        previous = masks
    assert ranking.masks(1.0).layer.all() and ranking.masks(1.0).unit.all()


def test_masks_read_back_from_their_marks():
    """Masks.marks: the layers, then each layer's units, as 0 and 1; flat_from_marks reads them
    back to Masks.flat; anything but 0 and 1 is refused."""
    from ppn_bayes.core.ranking import flat_from_marks

    arch = describe(tiny_lm("llama"), mlp_group=32)
    g = torch.Generator().manual_seed(5)
    masks = Ranking.from_log_lambda(arch, torch.randn(arch.n_layers, generator=g),
                                    torch.randn(arch.n_layers, arch.n_units, generator=g)).masks(0.4)
    marks = masks.marks()
    L = arch.n_layers
    assert marks[:L] == "".join("1" if k else "0" for k in masks.layer.tolist())
    assert marks[L + arch.n_units:L + 2 * arch.n_units] == "".join("1" if k else "0" for k in masks.unit[1].tolist())
    assert "0" in marks and "1" in marks
    assert torch.equal(flat_from_marks(marks), masks.flat())
    with pytest.raises(ValueError, match="masks are a string of 0 and 1, got '01x'"):
        flat_from_marks("01x")


def test_layers_rank_before_their_units():
    arch = describe(tiny_lm("llama"), mlp_group=32)
    for ranking in (Ranking.random(arch, seed=5),
                    Ranking.from_log_lambda(arch, torch.full((3,), -4.0), torch.full((3, 6), 9.0))):
        position = {tuple(item): i for i, item in enumerate(ranking.items.tolist())}
        for (layer, unit), i in position.items():
            if unit >= 0:
                assert position[(layer, -1)] < i


def test_masks_refuse_bad_sizes():
    ranking = Ranking.random(describe(tiny_lm("llama"), mlp_group=32))
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"size must lie in \(0, 1\]"):
            ranking.masks(bad)
    with pytest.raises(ValueError, match="below the smallest sub-network"):
        ranking.masks_for_params(1)
    by_count = ranking.masks_for_params(ranking.total_params // 2)
    assert by_count.kept_params <= ranking.total_params // 2


def test_masks_outside_the_trained_sizes_warn_and_the_sizes_travel_with_the_ranking():
    arch = describe(tiny_lm("llama"), mlp_group=32)
    plain = Ranking.random(arch, seed=3)
    ranking = plain.trained_on(0.5, 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the trained sizes, or a ranking that no fit trained: silent
        for size in (0.5, 0.7, 0.9):
            assert torch.equal(ranking.masks(size).flat(), plain.masks(size).flat())
        plain.masks(0.2)
        ranking.masks_for(Budget(n_params=ranking.total_params // 2 + 1))
    with pytest.warns(UntrainedSizeWarning,
                      match=r"size 0\.3 lies outside the sizes the fit trained \(0\.5 to 0\.9\).*--train-sizes"):
        below = ranking.masks(0.3)
    assert torch.equal(below.flat(), plain.masks(0.3).flat())  # the same masks, with a warning
    with pytest.warns(UntrainedSizeWarning, match=r"size 0\.95 "):
        ranking.masks(0.95)
    with pytest.warns(UntrainedSizeWarning, match=r"size 0\.(2|1999) lies outside"):  # a count reads as its fraction
        ranking.masks_for(Budget(n_params=ranking.total_params // 5))
    # the same bounds answer Ranking.untrained, ends included; a ranking no fit trained: never
    assert [ranking.untrained(s) for s in (0.3, 0.5, 0.7, 0.9, 0.95)] == [True, False, False, False, True]
    assert not any(plain.untrained(s) for s in (0.1, 0.5, 1.0))
    data = ranking.to_dict()
    assert data["trained_sizes"] == [0.5, 0.9] and "trained_sizes" not in plain.to_dict()
    again = Ranking.from_dict(arch, json.loads(json.dumps(data)))
    assert again.trained == (0.5, 0.9) and torch.equal(again.items, ranking.items)
    assert Ranking.from_dict(arch, plain.to_dict()).trained is None  # a file from before they were written
    for bad in ([0.9, 0.5], [0, 0.5], [0.5, 1.5], [0.5], ["0.5", 1], [True, 1], 0.5):
        with pytest.raises(ValueError, match="trained"):
            Ranking.from_dict(arch, {**plain.to_dict(), "trained_sizes": bad})


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_grid_search_finds_the_bisection_root(bits):
    ll, lu, cl, cu = _scales(spread=3.0)
    for size in (0.02, 0.4, 0.93):
        grid = solve_log_tau(size, ll, lu, cl, cu, bits=bits)
        bisection = solve_log_tau(size, ll, lu, cl, cu, bits=1)
        assert abs(float(grid - bisection)) < 1e-12
