"""The fit's recipe of issue 15: the learning-rate schedule, the activation start of the unit
locations, and a fit that stops at a deadline and resumes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_lm

from ppn_bayes.core.architecture import describe
from ppn_bayes.core.config import FitConfig
from ppn_bayes.data import TokenBlocks
from ppn_bayes.fit import fit, read_state
from ppn_bayes.deploy.finetune import DistillConfig, distill
from ppn_bayes.core.schedule import COSINE_FLOOR, lr_factor
from ppn_bayes.train.init import ACTIVATION_SPREAD, activation_start, rank_locations
from ppn_bayes.train.step import step_groups, step_sizes

TOKENS = torch.randint(0, 97, (400,), generator=torch.Generator().manual_seed(5))
CONFIG = FitConfig(steps=4, batch_size=2, seq_len=12, mlp_group=32, log_every=1, lr_lm=1e-3, teacher="original",
                   nll_weight=0.0, gate_coupling="prefix", init="activation", lr_schedule="cosine", warmup_steps=2)


def test_the_schedule_warms_up_linearly_then_follows_a_half_cosine_to_a_tenth():
    assert [lr_factor("constant", s, 10, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor("cosine", 0, 10) == 1.0
    assert lr_factor("cosine", 5, 10) == pytest.approx(COSINE_FLOOR + (1 - COSINE_FLOOR) / 2, abs=1e-15)
    assert lr_factor("cosine", 10, 10) == pytest.approx(COSINE_FLOOR, abs=1e-15)
    decay = [lr_factor("cosine", s, 50, 5) for s in range(4, 50)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor("linear", 0, 10)


def test_every_group_of_the_fit_runs_at_its_scheduled_rate(tmp_path):
    """The checkpoint's optimizer groups hold the rates of the last step (step 3 of 4)."""
    fit(tiny_lm("llama"), TOKENS, CONFIG, checkpoint=tmp_path / "c", progress=False)
    groups = {g["name"]: g["lr"] for g in read_state(tmp_path / "c")["optimizer_groups"]}
    factor = COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * 3 / 4))
    assert groups["lm"] == pytest.approx(CONFIG.lr_lm * factor, rel=1e-12)
    assert groups["guide"] == pytest.approx(CONFIG.lr_guide * factor, rel=1e-12)


def test_rank_locations_spread_each_layers_units_by_rank_within_their_kind():
    lm = tiny_lm("llama")
    arch = describe(lm, mlp_group=16)
    A, U = arch.n_attention_units, arch.n_units
    scores = torch.rand(arch.n_layers, U, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    locations = rank_locations(arch, scores)
    for part in (slice(0, A), slice(A, U)):
        n = scores[:, part].shape[1]
        for layer in range(arch.n_layers):
            order = scores[layer, part].argsort(descending=True)
            expected = [ACTIVATION_SPREAD * (1 - 2 * r / (n - 1)) for r in range(n)] if n > 1 else [0.0]
            assert locations[layer, part][order].tolist() == pytest.approx(expected, abs=1e-15)


def test_the_activation_start_orders_mlp_channels_without_changing_the_lm():
    lm = tiny_lm("llama")
    arch = describe(lm, mlp_group=16)
    ids = TOKENS[:24].view(2, 12)
    with torch.no_grad():
        before = lm(input_ids=ids).logits
    locations = activation_start(lm, arch, TokenBlocks(TOKENS, 12, seed=0))
    with torch.no_grad():
        after = lm(input_ids=ids).logits
    # The same sums in another order: float32 rounding of |logits| ~ 1 over 64 channels.
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    mlp = locations[:, arch.n_attention_units:]
    assert (mlp[:, :-1] > mlp[:, 1:]).all()  # ordered channels: the first unit is the most activated


def test_a_fit_with_the_activation_start_begins_at_its_ranks():
    """No step at all (lr 0 for the guide): the guide's unit locations are the ranks' spread."""
    lm = tiny_lm("llama")
    fitted = fit(lm, TOKENS, CONFIG.replace(steps=1, lr_guide=1e-12, mlp_group=16), progress=False)
    loc = fitted.guide.loc_unit.detach().double()
    A = fitted.guide.arch.n_attention_units
    assert loc[:, A:][:, 0].sub(ACTIVATION_SPREAD).abs().max() < 1e-6
    assert (loc[:, A:][:, :-1] > loc[:, A:][:, 1:]).all()


def test_a_fit_stopped_at_its_deadline_resumes_to_the_uninterrupted_result(tmp_path):
    whole = fit(tiny_lm("llama"), TOKENS, CONFIG, progress=False)
    cut = fit(tiny_lm("llama"), TOKENS, CONFIG, checkpoint=tmp_path / "c", progress=False, stop_after=1e-9)
    assert cut.result.steps_done == 1 and read_state(tmp_path / "c")["step"] == 1
    resumed = fit(tiny_lm("llama"), TOKENS, CONFIG, checkpoint=tmp_path / "c", resume=True, progress=False)
    assert resumed.result.steps_done == CONFIG.steps
    for (name, a), (_, b) in zip(whole.guide.state_dict().items(), resumed.guide.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    for (name, a), (_, b) in zip(whole.lm.state_dict().items(), resumed.lm.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_a_cosine_fit_cannot_resume_with_other_steps(tmp_path):
    fit(tiny_lm("llama"), TOKENS, CONFIG, checkpoint=tmp_path / "c", progress=False, stop_after=1e-9)
    with pytest.raises(ValueError, match="cosine schedule over 4 steps"):
        fit(tiny_lm("llama"), TOKENS, CONFIG.replace(steps=6), checkpoint=tmp_path / "c", resume=True,
            progress=False)


def test_distillation_without_the_next_token_loss_trains_on_the_kl_alone():
    student, teacher = tiny_lm("llama", seed=1), tiny_lm("llama")
    config = DistillConfig(steps=2, batch_size=2, seq_len=12, log_every=1, nll_weight=0.0, lr_schedule="cosine",
                           warmup_steps=1)
    result = distill(student, teacher, TOKENS, config, progress=False)
    # The loss is one weighted sum over the batch's 2 x 11 positions (weights 1/(2·11), each
    # rounded once), the logged KL a mean of row means: two float32 summation orders of the
    # same non-negative terms, each within about 22 unit roundoffs (2^-24) of the exact sum,
    # so they agree to rel 40 · 2^-24 ≈ 2.4e-6; 1e-5 leaves room. The NLL (> 1 nat on a
    # random tiny LM) would move the loss by far more than that.
    for row in result.history:
        assert row["loss"] == pytest.approx(row["kl"], rel=1e-5)
        assert row["nll"] > 1.0
    with pytest.raises(ValueError, match="both 0"):
        DistillConfig(nll_weight=0.0, distill_weight=0.0)


def test_size_power_bends_the_same_uniform_draws_towards_the_small_sizes():
    """Both configs read the same seeded uniforms u; with size_power p the k-th size is
    size_min + (size_max - size_min) u^p (float64: a few roundings, hence rel 1e-12)."""
    uniform = FitConfig(size_min=0.3, size_max=0.9, n_random_sizes=5, seed=3)
    bent = uniform.replace(size_power=2.5)
    for step in range(4):
        a, b = step_sizes(uniform, step), step_sizes(bent, step)
        assert a[0] == b[0] == 0.3
        for x, y in zip(a[1:], b[1:]):
            u = (x - 0.3) / 0.6
            assert y == pytest.approx(0.3 + 0.6 * u ** 2.5, rel=1e-12)
            assert 0.3 <= y <= x
    with pytest.raises(ValueError, match="size_power must be positive"):
        FitConfig(size_power=0.0)


def test_without_the_full_lm_every_row_trains_a_gated_size(tmp_path):
    config = CONFIG.replace(train_full_lm=False, n_random_sizes=2, batch_size=3)
    for step in range(3):
        sizes, groups = step_groups(config, step, 6)
        assert sorted(groups.tolist()) == [1, 1, 2, 2, 3, 3]  # no row of group 0, the rows dealt evenly
        assert sorted(step_groups(config.replace(train_full_lm=True), step, 8)[1].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    history = fit(tiny_lm("llama"), TOKENS, config, checkpoint=tmp_path / "c", progress=False).result.history
    assert [row["nll_full"] for row in history] == [None] * config.steps
    assert all(kl is not None and kl >= 0 for row in history for kl in row["kl"])


def test_adam_beta2_is_the_second_moment_decay_of_the_lms_weights_only(tmp_path):
    fit(tiny_lm("llama"), TOKENS, CONFIG.replace(adam_beta2=0.95), checkpoint=tmp_path / "c", progress=False)
    betas = {g["name"]: tuple(g["betas"]) for g in read_state(tmp_path / "c")["optimizer_groups"]}
    assert betas == {"lm": (0.9, 0.95), "guide": (0.9, 0.999)}  # the guide keeps PyTorch's default
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match="adam_beta2 must be in"):
            FitConfig(adam_beta2=bad)


def test_train_sizes_are_trained_every_step_beside_the_same_random_draws(tmp_path):
    """The named sizes come after size_min in every step's sizes and before the random ones,
    which are the draws of the same config without them (the same seeded uniforms); the rows
    are dealt evenly over the 1 + 2 + 1 gated groups; a fit with them trains and settles every
    one of them."""
    base = CONFIG.replace(train_full_lm=False, n_random_sizes=1, size_min=0.3, batch_size=4)
    named = base.replace(train_sizes=(0.5, 0.7))
    for step in range(3):
        plain, sizes = step_sizes(base, step), step_sizes(named, step)
        assert sizes == [0.3, 0.5, 0.7, plain[1]]
        assert sorted(step_groups(named, step, 8)[1].tolist()) == [1, 1, 2, 2, 3, 3, 4, 4]
    history = fit(tiny_lm("llama"), TOKENS, named.replace(settle_steps=2), checkpoint=tmp_path / "c",
                  progress=False).result.history
    assert [len(row["kl"]) for row in history] == [4] * named.steps
    for bad, match in (((0.3,), r"train_sizes must lie in \(size_min, 1\]"), ((1.2,), "train_sizes must lie"),
                       ((0.5, 0.5), "train_sizes has a size twice")):
        with pytest.raises(ValueError, match=match):
            named.replace(train_sizes=bad)
