"""Self-distillation fine-tune of one sub-network: the objective, its effect, its files."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import torch

from ppn_bayes import CharTokenizer, FitConfig, TokenBlocks, embedded_text, fit, tokenize
from ppn_bayes.deploy.finetune import DistillConfig, distill
from ppn_bayes.lm import tiny_llama
from ppn_bayes.deploy.subnetwork import build_subnetwork, load_subnetwork

TOKENIZER = CharTokenizer.for_text(embedded_text())
TOKENS = tokenize(embedded_text()[:30_000], TOKENIZER)


def _fitted(checkpoint=None):
    lm = tiny_llama(TOKENIZER.vocab_size, layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64, seed=0)
    config = FitConfig(steps=2, batch_size=2, seq_len=32, mlp_group=32)
    return fit(lm, TOKENS, config, checkpoint=checkpoint, tokenizer=TOKENIZER, progress=False)


def _recorded_distill(monkeypatch, config: DistillConfig) -> tuple:
    """``distill`` of a fitted LM's 0.5 sub-network towards that LM under ``config``, with the
    gradients of AdamW's first group recorded at every step: ``(teacher, the student before,
    the student after, the result, the gradients of each step)``."""
    fitted = _fitted()
    teacher = fitted.lm.eval()
    student = build_subnetwork(teacher, fitted.masks(0.5))
    before = copy.deepcopy(student)
    received = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            received.append([None if p.grad is None else p.grad.clone() for p in self.param_groups[0]["params"]])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    result = distill(student, teacher, TOKENS, config, progress=False)
    monkeypatch.undo()
    return teacher, before, student, result, received


def test_one_step_is_adamw_on_the_next_token_loss_plus_the_weighted_kl(monkeypatch):
    """Differential: one step of ``distill`` is AdamW on the gradient of
    NLL + w · Σ_v p_teacher (log p_teacher - log p_student), on the window the fit would draw.

    Checked in two parts, each well conditioned. AdamW's first step moves a weight by
    ``lr · g / (|g| + eps)``, whose slope ``lr · eps / (|g| + eps)²`` is ``lr / eps = 10⁶``
    at ``g ≈ 0``: comparing weights after the step would let the last bit of a near-zero
    gradient decide the test (it did, on some CPUs). So (1) the gradient AdamW receives is
    compared with a float64 reference within float32's rounding, and (2) the step is
    compared exactly with AdamW applied to that same gradient."""
    config = DistillConfig(steps=1, batch_size=3, seq_len=24, lr=1e-2, distill_weight=0.7, grad_clip=0.0, seed=5)
    teacher, before, student, result, received = _recorded_distill(monkeypatch, config)
    assert len(received) == 1

    # The reference: the objective written out, in float64 throughout.
    x = TokenBlocks(TOKENS, 24, 5).batch(0, 3)  # [3, 24]
    reference = copy.deepcopy(before).double().train()
    with torch.no_grad():
        p_teacher = torch.softmax(copy.deepcopy(teacher).double()(input_ids=x).logits[:, :-1], -1)
    log_p = torch.log_softmax(reference(input_ids=x).logits[:, :-1], -1)
    nll = -log_p.gather(-1, x[:, 1:, None]).mean()
    kl = (p_teacher * (p_teacher.log() - log_p)).sum(-1).mean()
    (nll + 0.7 * kl).backward()

    # float32 log-probabilities err by a few ulps of their size (|log p| < 10 here), so the
    # NLL by ~1e-7 relative, and the KL, a p-weighted sum of differences of two of them, by
    # at most ~2 · 2⁻²⁴ · (entropy + log-sum-exp) ≈ 1.2e-6 absolute.
    assert result.history[0]["nll"] == pytest.approx(float(nll.detach()), rel=1e-5)
    assert result.history[0]["kl"] == pytest.approx(float(kl.detach()), rel=1e-4, abs=2e-6)
    # (1) A float32 backward pass sums at most B·(T-1) = 69 products per weight (and 64 per
    # activation), so each gradient errs by under ~69 · 2⁻²⁴ ≈ 4e-6 of its tensor's largest
    # entry; the bound checked is 1e-5 of it (seen on x86: under 4e-7).
    names = [name for name, _ in student.named_parameters()]
    for name, got, want in zip(names, received[0], reference.parameters()):
        if want.grad is None:  # zero-width weights, or the norms of a layer that keeps no unit
            assert got is None, name
            continue
        scale = float(want.grad.abs().max())
        torch.testing.assert_close(got.double(), want.grad, rtol=0, atol=1e-5 * scale, msg=name)
    # (2) The step itself: AdamW (lr, no weight decay) on exactly those gradients, bit for bit.
    replay = copy.deepcopy(before)
    for p, grad in zip(replay.parameters(), received[0]):
        p.grad = grad
    torch.optim.AdamW(replay.parameters(), lr=1e-2, weight_decay=0.0).step()
    for name, a, b in zip(names, student.parameters(), replay.parameters()):
        assert torch.equal(a, b), name
    assert result.train_tokens == 3 * 24 and not student.training


def test_distillation_brings_the_sub_network_towards_the_teacher_and_leaves_the_teacher_alone():
    from ppn_bayes.demo import pretrain

    fitted = _fitted()
    teacher = fitted.lm
    pretrain(teacher, TokenBlocks(TOKENS, 64), steps=100, batch_size=8, progress=False)  # a teacher worth copying
    teacher.train()
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    student = build_subnetwork(teacher, fitted.masks(0.3))
    windows = TokenBlocks(TOKENS, 64).windows(16)  # [16, 64], fixed

    def kl_to_teacher() -> float:
        with torch.no_grad():
            p = torch.log_softmax(teacher.eval()(input_ids=windows).logits.double(), -1)
            q = torch.log_softmax(student.eval()(input_ids=windows).logits.double(), -1)
        teacher.train()
        return float((p.exp() * (p - q)).sum(-1).mean())

    before_kl = kl_to_teacher()
    config = DistillConfig(steps=60, batch_size=8, seq_len=64, lr=3e-3, distill_weight=4.0)
    distill(student, teacher, TOKENS, config, progress=False)
    after_kl = kl_to_teacher()
    assert after_kl < 0.6 * before_kl
    assert all(torch.equal(before[name], p) for name, p in teacher.named_parameters())
    assert teacher.training  # left as it was found


def test_distill_names_bad_input():
    fitted = _fitted()
    other = tiny_llama(TOKENIZER.vocab_size + 3, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)
    student = build_subnetwork(fitted.lm, fitted.masks(0.5))
    with pytest.raises(ValueError, match="one vocabulary"):
        distill(student, other, TOKENS, DistillConfig(steps=1, seq_len=16), progress=False)
    with pytest.raises(ValueError, match="outside the LM's vocabulary"):
        distill(student, fitted.lm, TOKENS + 1000, DistillConfig(steps=1, seq_len=16), progress=False)
    for bad in (dict(steps=0), dict(lr=0.0), dict(seq_len=1), dict(distill_weight=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DistillConfig(**bad)


def test_distill_cli_writes_a_loadable_sub_network_with_its_report(tmp_path):
    from ppn_bayes.deploy.resize import export_ranked

    _fitted(checkpoint=tmp_path / "fit")
    (tmp_path / "train.txt").write_text(embedded_text()[:20_000])
    (tmp_path / "held_out.txt").write_text(embedded_text()[20_000:24_000])
    export_ranked(tmp_path / "fit", tmp_path / "ranked")
    for source in ("fit", "ranked"):
        out = tmp_path / f"sub-{source}"
        args = ["ppn-bayes", "distill", str(tmp_path / source), "--size", "0.5", "--data", str(tmp_path / "train.txt"),
                "--out", str(out), "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--log-every", "1",
                "--eval-data", str(tmp_path / "held_out.txt"), "--eval-windows", "2", "--quiet"]
        done = subprocess.run(args, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        printed = json.loads(done.stdout.strip().splitlines()[-1])
        assert printed["steps"] == 3 and printed["ppl_before"] > 0 and printed["ppl_after"] > 0
        report = json.loads((out / "distill.json").read_text())
        assert [row["step"] for row in report["result"]["history"]] == [0, 1, 2]
        assert report["size_reached"] <= 0.5 and report["eval"]["windows"] == 2
        sub = load_subnetwork(out)
        assert sum(p.numel() for p in sub.model.layers.parameters()) == report["decoder_params"]
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
    bad = subprocess.run(args[:-1] + ["--overwrite", "--bf16"], capture_output=True, text=True)
    assert bad.returncode == 2 and "CUDA" in bad.stderr
    bad = subprocess.run(["ppn-bayes", "distill", str(out), "--size", "0.5", "--data", str(tmp_path / "train.txt"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a fit or ranked checkpoint" in bad.stderr


def test_a_resumed_fine_tune_ends_where_an_uninterrupted_one_does(tmp_path):
    fitted = _fitted()
    teacher = fitted.lm.eval()
    config = DistillConfig(steps=6, batch_size=2, seq_len=24, lr=1e-2, log_every=1, checkpoint_every=3)
    whole = build_subnetwork(teacher, fitted.masks(0.5))
    uninterrupted = distill(whole, teacher, TOKENS, config, progress=False)

    first = build_subnetwork(teacher, fitted.masks(0.5))
    distill(first, teacher, TOKENS, config.replace(steps=4), checkpoint=tmp_path / "ckpt", progress=False)
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["step"] == 3  # the checkpoint of step 3; step 4 was lost with the "crash"
    again = build_subnetwork(teacher, fitted.masks(0.5))
    resumed = distill(again, teacher, TOKENS, config, checkpoint=tmp_path / "ckpt", resume=True, progress=False)
    assert resumed.resumed_from == 3 and resumed.history == uninterrupted.history
    for (name, a), b in zip(whole.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="other settings"):
        distill(build_subnetwork(teacher, fitted.masks(0.5)), teacher, TOKENS, config.replace(lr=1e-3),
                checkpoint=tmp_path / "ckpt", resume=True, progress=False)
    from ppn_bayes.io import FileFormatError

    with pytest.raises(FileFormatError, match="does not fit this sub-network"):
        distill(build_subnetwork(teacher, fitted.masks(0.3)), teacher, TOKENS, config,
                checkpoint=tmp_path / "ckpt", resume=True, progress=False)


def test_a_fine_tune_stopped_by_its_deadline_resumes_to_the_uninterrupted_result(tmp_path):
    """stop_after: the fine-tune stops at the first step past the deadline with a checkpoint
    there (already past it: after one step), and a resumed run ends where an uninterrupted
    one does, bit for bit; a deadline never reached changes nothing."""
    fitted = _fitted()
    teacher = fitted.lm.eval()
    config = DistillConfig(steps=5, batch_size=2, seq_len=24, lr=1e-2, log_every=2)
    whole = build_subnetwork(teacher, fitted.masks(0.5))
    uninterrupted = distill(whole, teacher, TOKENS, config, progress=False)
    assert uninterrupted.stopped_at is None and [r["step"] for r in uninterrupted.history] == [0, 2, 4]

    first = build_subnetwork(teacher, fitted.masks(0.5))
    stopped = distill(first, teacher, TOKENS, config, checkpoint=tmp_path / "ckpt", stop_after=1e-9, progress=False)
    assert stopped.stopped_at == 1 and stopped.history == uninterrupted.history[:1]
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 1
    resumed = distill(first, teacher, TOKENS, config, checkpoint=tmp_path / "ckpt", resume=True, stop_after=1e9,
                      progress=False)
    assert resumed.stopped_at is None and resumed.resumed_from == 1 and resumed.history == uninterrupted.history
    for (name, a), b in zip(whole.named_parameters(), first.parameters()):
        assert torch.equal(a, b), name
    student = build_subnetwork(teacher, fitted.masks(0.5))
    with pytest.raises(ValueError, match="needs the checkpoint directory"):
        distill(student, teacher, TOKENS, config, stop_after=10.0, progress=False)
    with pytest.raises(ValueError, match="positive number of seconds"):
        distill(student, teacher, TOKENS, config, checkpoint=tmp_path / "x", stop_after=0.0, progress=False)


def test_a_non_finite_loss_stops_the_fine_tune_naming_its_step(monkeypatch):
    """The losses are read back one logged step late; the step named is the one the
    non-finite loss came from, and the fine-tune goes no further than the next logged step."""
    from ppn_bayes.deploy import finetune

    fitted = _fitted()
    teacher = fitted.lm.eval()
    real, calls = finetune._distill_loss, []

    def poisoned(*args):
        loss, nll, kl = real(*args)
        calls.append(len(calls))
        return (loss * float("nan"), nll, kl) if len(calls) == 3 else (loss, nll, kl)  # step 2

    monkeypatch.setattr(finetune, "_distill_loss", poisoned)
    config = DistillConfig(steps=8, batch_size=2, seq_len=24, lr=1e-2, log_every=2)
    with pytest.raises(FloatingPointError, match="at step 2;"):
        distill(build_subnetwork(teacher, fitted.masks(0.5)), teacher, TOKENS, config, progress=False)
    assert len(calls) == 5  # steps 0 to 4: step 2's figures were read when step 4 logged its own


def test_distill_cli_resumes_and_cleans_up(tmp_path):
    from ppn_bayes.data import load_tokens
    from ppn_bayes.deploy.artifacts import open_model

    _fitted(checkpoint=tmp_path / "fit")
    (tmp_path / "train.txt").write_text(embedded_text()[:20_000])

    def args(out):
        return ["ppn-bayes", "distill", str(tmp_path / "fit"), "--size", "0.5", "--data", str(tmp_path / "train.txt"),
                "--out", str(out), "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--checkpoint-every", "2",
                "--log-every", "1", "--quiet"]

    out = tmp_path / "sub"
    missing = subprocess.run(args(out) + ["--resume"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no distill checkpoint to resume" in missing.stderr
    # an interrupted run: 3 of its 4 steps, checkpointed at step 2
    student, full = open_model(tmp_path / "fit", size=0.5), open_model(tmp_path / "fit")
    tokens = load_tokens(tmp_path / "train.txt", full.tokenizer)
    distill(student.lm, full.lm, tokens, DistillConfig(steps=3, batch_size=2, seq_len=32, checkpoint_every=2,
                                                       log_every=1),
            checkpoint=tmp_path / "sub.distill-checkpoint", progress=False)
    fresh = subprocess.run(args(out), capture_output=True, text=True)
    assert fresh.returncode == 2 and "--resume" in fresh.stderr
    resumed = subprocess.run(args(out) + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "distill.json").read_text())
    assert report["result"]["resumed_from"] == 2 and [r["step"] for r in report["result"]["history"]] == [0, 1, 2, 3]
    assert not (tmp_path / "sub.distill-checkpoint").exists()
    whole = subprocess.run(args(tmp_path / "whole"), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    a, b = load_subnetwork(out), load_subnetwork(tmp_path / "whole")
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name
    # --stop-after: a checkpoint at the first step past the deadline, no OUT; --resume ends the run
    stop = subprocess.run(args(tmp_path / "late") + ["--stop-after", "1e-9"], capture_output=True, text=True)
    assert stop.returncode == 0, stop.stderr
    assert json.loads(stop.stdout.splitlines()[-1])["stopped_at"] == 1 and not (tmp_path / "late").exists()
    assert (tmp_path / "late.distill-checkpoint" / "state.json").is_file()
    resumed = subprocess.run(args(tmp_path / "late") + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for (name, x), y in zip(load_subnetwork(tmp_path / "late").named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


def test_the_compiled_fine_tune_equals_the_eager_one_bit_for_bit():
    """compile='aot_eager' (the traced graphs run by the same kernels) computes what eager
    distillation does, with one graph per decoder body, one for the objective's chunk, and no
    recompiles across steps."""
    from torch._dynamo.utils import counters

    fitted = _fitted()
    teacher = fitted.lm.eval()
    config = DistillConfig(steps=3, batch_size=2, seq_len=24, lr=1e-2, log_every=1)
    eager_student = build_subnetwork(teacher, fitted.masks(0.5))
    eager = distill(eager_student, teacher, TOKENS, config, progress=False)
    torch._dynamo.reset()
    counters.clear()
    compiled_student = build_subnetwork(teacher, fitted.masks(0.5))
    compiled = distill(compiled_student, teacher, TOKENS, config.replace(compile="aot_eager"), progress=False)
    assert compiled.history == eager.history
    for (name, a), b in zip(eager_student.named_parameters(), compiled_student.parameters()):
        assert torch.equal(a, b), name
    assert counters["stats"]["unique_graphs"] == 3 and not counters["recompiles"]
    with pytest.raises(ValueError, match="compile must be one of"):
        DistillConfig(compile="tvm")


def test_adam_beta2_is_the_second_moment_decay_of_the_fine_tune(monkeypatch):
    """Two steps with ``adam_beta2=0.5`` are AdamW with betas (0.9, 0.5) on the gradients the
    optimizer received, bit for bit; with PyTorch's 0.999 the second step lands elsewhere (the
    first step of Adam does not depend on beta2)."""
    config = DistillConfig(steps=2, batch_size=2, seq_len=24, lr=1e-2, grad_clip=0.0, adam_beta2=0.5)
    _, before, student, _, received = _recorded_distill(monkeypatch, config)
    assert len(received) == 2

    def replay(beta2):
        lm = copy.deepcopy(before)
        optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2, weight_decay=0.0, betas=(0.9, beta2))
        for grads in received:
            for p, grad in zip(lm.parameters(), grads):
                p.grad = grad
            optimizer.step()
        return lm

    same, default = replay(0.5), replay(0.999)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), same.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(student.parameters(), default.parameters()))
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="adam_beta2"):
            DistillConfig(adam_beta2=bad)
