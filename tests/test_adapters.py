"""Size adapters: the interpolation weights, the gated forward against the merged and sliced
sub-network, a fit with and without them, checkpoints, and the paths that refuse them."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_lm

from ppn_bayes import CharTokenizer, FitConfig, GatedLM, Ranking, embedded_text, fit, tokenize
from ppn_bayes.core.adapters import SizeAdapters, anchor_weights
from ppn_bayes.core.architecture import describe
from ppn_bayes.core.gating import Gates
from ppn_bayes.core.model import PuppetModel, StepPlan
from ppn_bayes.deploy.subnetwork import build_subnetwork, load_subnetwork, save_subnetwork
from ppn_bayes.lm import tiny_llama
from ppn_bayes.train import load_fit

TEXT = embedded_text()[:60_000]
TOKENIZER = CharTokenizer.for_text(embedded_text())
TOKENS = tokenize(TEXT, TOKENIZER)
ANCHORS = (0.3, 0.5, 0.7, 0.9, 1.0)
CONFIG = FitConfig(steps=4, batch_size=4, seq_len=32, mlp_group=8, size_rank=2, lr_lm=1e-2, log_every=1,
                   gate_coupling="prefix", init_jitter=0.5, n_random_sizes=1, size_min=0.3)


def _tiny(dtype=torch.float32):
    return tiny_llama(TOKENIZER.vocab_size, layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64).to(dtype)


def _fit(config=CONFIG, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny fit's training budget warning
        return fit(_tiny(), TOKENS, config, progress=False, **kwargs)


# 1. the weights -------------------------------------------------------------------------
def test_the_weights_are_hat_functions_of_the_size():
    # one-hot at every anchor, exactly
    for k, a in enumerate(ANCHORS):
        assert torch.equal(anchor_weights(a, ANCHORS), torch.eye(len(ANCHORS), dtype=torch.float64)[k])
    # clamped to the end anchors outside them
    assert torch.equal(anchor_weights(0.1, ANCHORS), anchor_weights(0.3, ANCHORS))
    assert torch.equal(anchor_weights(torch.tensor([0.05, 0.299]), ANCHORS)[1], anchor_weights(0.3, ANCHORS))
    # linear between two neighbours, summing to 1, zero elsewhere
    sizes = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)
    w = anchor_weights(sizes, ANCHORS)  # [201, K]
    assert w.shape == (201, 5) and (w >= 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(201, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(anchor_weights(0.6, ANCHORS), torch.tensor([0, 0.5, 0.5, 0, 0], dtype=torch.float64),
                          rtol=0, atol=1e-15)
    assert torch.allclose(anchor_weights(0.95, ANCHORS), torch.tensor([0, 0, 0, 0.5, 0.5], dtype=torch.float64),
                          rtol=0, atol=1e-15)
    s = torch.tensor(0.42, dtype=torch.float64)
    expected = torch.tensor([(0.5 - s) / 0.2, (s - 0.3) / 0.2, 0, 0, 0], dtype=torch.float64)
    assert torch.allclose(anchor_weights(s, ANCHORS), expected, rtol=0, atol=1e-15)
    # at most two neighbours are non-zero, and they interpolate the size itself
    assert ((w > 0).sum(-1) <= 2).all()
    inside = (sizes >= 0.3)
    assert torch.allclose((w * torch.tensor(ANCHORS, dtype=torch.float64)).sum(-1)[inside], sizes[inside],
                          rtol=0, atol=1e-15)
    # one anchor: the same correction at every size
    assert torch.equal(anchor_weights(torch.tensor([0.2, 0.9]), (0.5,)), torch.ones(2, 1, dtype=torch.float64))


@pytest.mark.parametrize("anchors, message", [
    ((), "at least one size"), ((0.5, 0.3), "strictly increasing"), ((0.5, 0.5), "strictly increasing"),
    ((0.0, 0.5), r"lie in \(0, 1\]"), ((0.5, 1.5), r"lie in \(0, 1\]"),
])
def test_bad_anchors_are_named(anchors, message):
    with pytest.raises(ValueError, match="size_anchors .*" + message):
        FitConfig(size_rank=2, size_anchors=anchors)


def test_bad_settings_of_the_adapters_are_named():
    with pytest.raises(ValueError, match="size_rank must not be negative"):
        FitConfig(size_rank=-1)
    with pytest.raises(ValueError, match="size adapters train with the LM's weights; with train_lm off"):
        FitConfig(size_rank=2, train_lm=False)
    config = FitConfig(size_rank=3, size_anchors=(0.4, 1.0))
    assert FitConfig.from_dict(config.to_dict()) == config  # JSON lists come back as tuples


# 2. the differential test -----------------------------------------------------------------
def _random_adapters(lm, seed=1):
    adapters = SizeAdapters(lm, ANCHORS, rank=3, seed=seed, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.3)
    return adapters


def test_the_gated_forward_equals_the_merged_and_sliced_subnetwork_of_each_rows_size():
    """Two rows at two sizes (one between anchors, one on an anchor), each under the deployed
    masks of a ranking at its size with random non-zero adapters, give the logits of the
    sub-network sliced from the LM with that size's correction merged. In float64 the two
    differ only by the order of the sums (``x (W + Σ w B A)ᵀ`` against ``x Wᵀ + Σ w (x Aᵀ) Bᵀ``):
    about 1e-15 relative on logits of order 1 through 3 layers, so 1e-10 is tight and
    leaves no room for a misplaced term (a correction of one size at the other, or added after
    the layer gate, moves the logits by 1e-2 or more)."""
    lm = tiny_lm("llama").double()
    arch = describe(lm, mlp_group=32)
    adapters = _random_adapters(lm)
    ranking = Ranking.from_log_lambda(arch, torch.tensor([2.0, -1.0, 1.0]), torch.randn(arch.n_layers, arch.n_units,
                                      generator=torch.Generator().manual_seed(3)))
    sizes = (0.42, 0.7)
    masks = [ranking.masks(s) for s in sizes]
    assert not torch.equal(masks[0].unit, masks[1].unit)
    gated = GatedLM(lm, arch, adapters=adapters)
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    gates = Gates(torch.stack([m.gates(dtype=torch.float64).layer for m in masks]),
                  torch.stack([m.gates(dtype=torch.float64).unit for m in masks]))
    with torch.no_grad():
        logits = gated(x, gates=gates, size_weights=gated.size_weights(torch.tensor(sizes, dtype=torch.float64)))
        for row, (size, m) in enumerate(zip(sizes, masks)):
            merged = adapters.merge_(copy.deepcopy(lm), size)
            sub = build_subnetwork(merged, m)
            expected = sub(x[row:row + 1]).logits[0]
            gap = (logits[row] - expected).abs().max()
            assert torch.allclose(logits[row], expected, rtol=0, atol=1e-10), (size, gap)
            # the size matters: the other row's correction gives other logits
            other = build_subnetwork(adapters.merge_(copy.deepcopy(lm), sizes[1 - row]), m)(x[row:row + 1]).logits[0]
            assert (other - expected).abs().max() > 1e-3
        # the likelihood's per-row weights are those of each row's group (group 0 at size 1)
        model = PuppetModel(gated)
        plan = StepPlan(sizes, torch.tensor([0, 2, 1]), torch.full((3,), 1 / 3))
        expected = gated.size_weights(torch.tensor([1.0, 0.7, 0.42], dtype=torch.float64))
        assert torch.equal(model.size_weights(plan, "cpu"), expected)
    gated.unload()


def test_the_forward_hook_sees_the_input_the_unit_gates_left():
    """The adapters read the projection's input after the unit hook: gates that drop every
    unit of a layer but keep the layer leave only the projections' own biases (none for
    Llama), so the adapters add nothing there either."""
    lm = tiny_lm("llama").double()
    arch = describe(lm, mlp_group=32)
    adapters = _random_adapters(lm)
    seen = []
    o = lm.model.layers[0].self_attn.o_proj
    handle = o.register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    gated = GatedLM(lm, arch, adapters=adapters)
    gates = Gates.ones(arch, dtype=torch.float64)
    unit = gates.unit.clone()
    unit[0] = 0
    x = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        gated(x, gates=Gates(gates.layer, unit), size_weights=gated.size_weights(0.5))
    assert seen[-1].abs().max() == 0  # a hook registered before GatedLM's sees the masked input too
    handle.remove()
    gated.unload()


# 3. off by default, and a no-op at the start ---------------------------------------------
def test_without_adapters_a_fit_is_as_before_and_with_b_zero_the_gated_lm_is_the_base_lm(tmp_path, monkeypatch):
    """size_rank=0 (the default): no adapters, the checkpoint's files and optimizer groups as
    before, and the gated LM's compiled-style hidden pass called with the gates alone. (The
    losses, held-out NLL, LM, guide and checkpoint tensors of a 5-step fit were checked equal
    to the bit against the code before the adapters, by hand.)"""
    config = CONFIG.replace(size_rank=0)
    calls = []
    original = GatedLM._gated_hidden
    monkeypatch.setattr(GatedLM, "_gated_hidden", lambda self, *args: calls.append(len(args)) or original(self, *args))
    plain = _fit(config, checkpoint=tmp_path / "ckpt")
    assert calls and set(calls) == {3}  # input_ids, layer, unit: no size weights
    assert plain.adapters is None and plain.lm_at(0.5) is plain.lm
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["guide.safetensors", "lm",
                                                                      "optimizer.safetensors", "state.json"]
    from ppn_bayes.train.checkpoint import read_state

    groups = read_state(tmp_path / "ckpt")["optimizer_groups"]
    assert [len(g["params"]) for g in groups] == [4, len(list(plain.lm.parameters()))]
    # at the start (B = 0) the adapters change no bit of the logits, under any gates and sizes
    lm = tiny_lm("llama")
    arch = describe(lm, mlp_group=32)
    adapters = SizeAdapters(lm, ANCHORS, rank=2, seed=0)
    assert all(float(p.detach().abs().max()) == 0 for n, p in adapters.named_parameters() if n.endswith("_B"))
    assert all(float(p.detach().abs().max()) > 0 for n, p in adapters.named_parameters() if n.endswith("_A"))
    x = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        base = lm(x).logits
        gated = GatedLM(lm, arch, adapters=adapters)
        ones = Gates.ones(arch)
        assert torch.equal(gated(x, gates=ones, size_weights=gated.size_weights(torch.tensor([1.0, 0.4]))), base)
        assert torch.equal(gated(x, gates=ones), base)
        assert torch.equal(gated(x), base)
        gated.unload()
        assert torch.equal(adapters.merge_(copy.deepcopy(lm), 0.4)(x).logits, base)


def test_adapters_are_seeded_and_need_gates_to_apply():
    lm = tiny_lm("llama")
    a, b, c = (SizeAdapters(lm, ANCHORS, 2, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.layers[0].o_A, c.layers[0].o_A)
    assert a.layers[0].o_A.shape == (5, 2, 32) and a.layers[0].o_B.shape == (5, 32, 2)
    assert a.layers[0].mlp_out_A.shape == (5, 2, 128) and a.layers[0].mlp_out_B.shape == (5, 32, 2)
    gated = GatedLM(lm, describe(lm, mlp_group=32), adapters=a)
    with pytest.raises(ValueError, match="size weights apply with gates only"):
        gated(torch.zeros(1, 4, dtype=torch.long), size_weights=gated.size_weights(0.5))
    with pytest.raises(ValueError, match="do not fit 5 anchors"):
        gated(torch.zeros(1, 4, dtype=torch.long), gates=Gates.ones(gated.arch), size_weights=torch.ones(1, 3))
    gated.unload()


# 4. checkpoints ----------------------------------------------------------------------------
def test_a_fit_with_adapters_resumes_to_the_uninterrupted_one_and_loads_with_them(tmp_path):
    """Stopped after every step and resumed, the fit ends with the LM, the guide and the
    adapters of the uninterrupted one, to the bit; load_fit reads the adapters back."""
    whole = _fit()
    assert float(whole.adapters.layers[0].o_B.detach().abs().max()) > 0  # they trained
    checkpoint = tmp_path / "ckpt"
    fitted = _fit(checkpoint=checkpoint, stop_after=1e-9)
    while fitted.result.steps_done < CONFIG.steps:
        assert (checkpoint / "adapters.safetensors").is_file()
        fitted = _fit(checkpoint=checkpoint, resume=True, stop_after=1e-9)
    for (name, value), other in zip(fitted.adapters.named_parameters(), whole.adapters.parameters()):
        assert torch.equal(value, other), name
    assert all(torch.equal(p, q) for p, q in zip(fitted.guide.parameters(), whole.guide.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(fitted.lm.parameters(), whole.lm.parameters()))
    loaded = load_fit(checkpoint)
    for (name, value), other in zip(loaded.adapters.named_parameters(), whole.adapters.parameters()):
        assert torch.equal(value, other), name
    # a checkpoint that lost its adapters is refused by name
    (checkpoint / "adapters.safetensors").unlink()
    with pytest.raises(Exception, match="adapters.safetensors is missing"):
        load_fit(checkpoint)


# 5. refusals -----------------------------------------------------------------------------
def test_paths_that_cannot_carry_adapters_refuse_them(tmp_path):
    from ppn_bayes.deploy.artifacts import export_masks, open_model, open_ranked_lm, resize_checkpoint
    from ppn_bayes.deploy.resize import export_ranked

    checkpoint = tmp_path / "ckpt"
    fitted = _fit(CONFIG.replace(steps=1), checkpoint=checkpoint)
    named = "is a fit with size adapters .*cannot carry them"
    with pytest.raises(ValueError, match=named + "|" + "size adapters .*: a mask file"):
        export_masks(checkpoint, tmp_path / "masks.json", sizes=[0.5])
    with pytest.raises(ValueError, match="is a fit with size adapters .*--keep-ranked.* cannot carry them"):
        resize_checkpoint(checkpoint, tmp_path / "sub", size=0.5, keep_ranked=tmp_path / "ranked")
    with pytest.raises(ValueError, match=named):
        export_ranked(checkpoint, tmp_path / "ranked")
    with pytest.raises(ValueError, match=named):
        export_ranked(fitted, tmp_path / "ranked")
    with pytest.raises(ValueError, match=named):
        open_ranked_lm(checkpoint)
    assert not (tmp_path / "masks.json").exists() and not (tmp_path / "sub").exists()
    assert not (tmp_path / "ranked").exists()
    # FSDP and GPT-2's Conv1D projections, before any work
    with pytest.raises(ValueError, match="size adapters .* not available with parallel='fsdp'"):
        fit(_tiny(), TOKENS, CONFIG.replace(parallel="fsdp"), progress=False)
    gpt2 = tiny_lm("gpt2")
    with pytest.raises(ValueError, match="not available for gpt2 models, whose projections are Conv1D"):
        fit(gpt2, TOKENS.clamp(max=96), CONFIG, progress=False)
    assert not any(module._forward_hooks for module in gpt2.modules())
    # and open_model and resize (without --keep-ranked) cut the fit as it ships
    opened = open_model(checkpoint, size=0.5)
    sub, masks = fitted.subnetwork(0.5)
    x = TOKENS[:32][None]
    with pytest.raises(ValueError, match="size"):  # a bad size, before the LM loads: nothing written
        resize_checkpoint(checkpoint, tmp_path / "sub", size=1.5)
    assert not (tmp_path / "sub").exists()
    result = resize_checkpoint(checkpoint, tmp_path / "sub", size=0.5)
    assert (result.size_reached, result.kept_params) == (masks.size_reached, masks.kept_params)
    with pytest.raises(FileExistsError):
        resize_checkpoint(checkpoint, tmp_path / "sub", size=0.5)
    with torch.no_grad():
        assert torch.equal(opened.lm(x).logits, sub(x).logits)
        assert torch.equal(load_subnetwork(tmp_path / "sub")(x).logits, sub(x).logits)


# 6. end to end ---------------------------------------------------------------------------
def test_a_fit_with_adapters_exports_subnetworks_that_load_and_match_the_gated_forward(tmp_path):
    """A tiny fit with size_rank=2 on the CPU: each size's sub-network (its masks sliced
    from the LM with its correction merged) saves, loads and gives the logits of the fitted
    LM under the same masks and the size's weights (float32: the merged sums round once
    more, so 1e-5 on logits of order 1); the merged LM differs from the fit's own."""
    fitted = _fit(eval_tokens=TOKENS[-4_000:])
    assert fitted.result.validation  # the held-out diagnostics ran on the merged LMs
    x = TOKENS[:64].reshape(2, 32)
    for size in (0.3, 0.6, 1.0):
        sub, masks = fitted.subnetwork(size)
        save_subnetwork(sub, None, tmp_path / f"sub{size}")
        loaded = load_subnetwork(tmp_path / f"sub{size}")
        gated = GatedLM(fitted.lm, fitted.arch, adapters=fitted.adapters)
        with torch.no_grad():
            expected = gated(x, gates=masks.gates(), size_weights=gated.size_weights(size))
            without = gated(x, gates=masks.gates())
            got = loaded(x).logits
        gated.unload()
        assert torch.allclose(got, expected, rtol=0, atol=1e-5), (size, (got - expected).abs().max())
        assert (without - expected).abs().max() > 1e-4  # the adapters are part of what ships
    before = [p.clone() for p in fitted.lm.parameters()]
    merged = fitted.lm_at(0.5)
    assert all(torch.equal(p, q) for p, q in zip(before, fitted.lm.parameters()))  # lm_at leaves the LM alone
    assert any(not torch.equal(p, q) for p, q in zip(merged.parameters(), fitted.lm.parameters()))
    # subnetwork merges in place and undoes it: the LM to the bit, the sub-network that of the copy lm_at makes
    sub, masks = fitted.subnetwork(0.5)
    assert all(torch.equal(p, q) for p, q in zip(before, fitted.lm.parameters()))
    reference = build_subnetwork(merged, masks)
    assert [n for n, _ in sub.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert all(torch.equal(p, q) for p, q in zip(sub.parameters(), reference.parameters()))
