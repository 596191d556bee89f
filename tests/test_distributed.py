"""Fitting in several processes: DDP and FSDP2 on gloo against the single process.

One ``torchrun --nproc-per-node 2`` launch (module fixture) runs the tiny fits of
``dist_fit_cases.CASES`` with a per-process batch of ``B/2``; each is compared with the
same fit in this process with batch ``B``: the same global batch, the same sizes and gate
draws, so the losses and the final guide and LM agree to float rounding.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_fit_cases import CASES, case_eval_tokens, case_lm, case_tokens
from safetensors.torch import load_file

from ppn_bayes import distributed
from ppn_bayes.core.config import FitConfig
from ppn_bayes.data import TokenBlocks
from ppn_bayes.core.model import PuppetELBO, StepPlan
from ppn_bayes.inspect.evaluate import perplexity
from ppn_bayes.fit import fit, load_fit
from ppn_bayes.core.objective import Teacher, plain_objective
from ppn_bayes.train.state import build_model, build_optimizer
from ppn_bayes.train.step import step_sizes
from ppn_bayes.core.gating import GatedLM
from ppn_bayes.core.ranking import Ranking

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent / "benchmarks"
ATOL = 1e-5


def _tensors(fitted) -> dict[str, torch.Tensor]:
    out = {f"guide.{k}": v.detach() for k, v in fitted.guide.state_dict().items()}
    out.update({f"lm.{k}": v.detach() for k, v in fitted.lm.state_dict().items()})
    if fitted.adapters is not None:
        out.update({f"adapters.{k}": v.detach() for k, v in fitted.adapters.state_dict().items()})
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The folder where the 2-process gloo run of every case left its results."""
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "dist_fit_worker.py"), "--out", str(out), "--cli"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def one_process():
    """Every case fitted in this process with the whole global batch."""
    torch.set_num_threads(1)
    return {name: fit(case_lm(name), case_tokens(), CASES[name]["config"].replace(parallel="none"), progress=False,
                      eval_tokens=case_eval_tokens(name))
            for name in CASES if CASES[name]["config"].parallel == "ddp"}


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_follow_one_process_on_the_same_global_batch(two_processes, one_process, name):
    reference = one_process.get(name, one_process["ddp"])  # fsdp-resume: the ddp case's training
    result = json.loads((two_processes / name / "result.json").read_text())
    assert result["world_size"] == 2 and result["parallel"] == CASES[name]["config"].parallel
    assert result["train_tokens"] == reference.result.train_tokens  # the global batch
    assert [row["step"] for row in result["history"]] == [row["step"] for row in reference.result.history]
    for got, want in zip(result["history"], reference.result.history):
        assert got["loss"] == pytest.approx(want["loss"], abs=ATOL)
        assert got["nll_full"] == pytest.approx(want["nll_full"], abs=ATOL)
    if CASES[name].get("eval"):  # held-out NLL: the same rows as one process
        assert [row["step"] for row in result["validation"]] == [2, 4]
        for got, want in zip(result["validation"], reference.result.validation, strict=True):
            assert got["nll_full"] == pytest.approx(want["nll_full"], abs=ATOL)
            for a, b in zip(got["sizes"], want["sizes"], strict=True):  # the deployed masks, the same in both
                assert (a["size"], a["kept"]) == (b["size"], b["kept"])
                assert a["nll"] == pytest.approx(b["nll"], abs=ATOL)
    ranks = [load_file(two_processes / name / f"rank{r}.safetensors") for r in (0, 1)]
    want = _tensors(reference)
    assert set(ranks[0]) == set(want)
    for key, value in want.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between the processes"
        torch.testing.assert_close(ranks[0][key], value, atol=ATOL, rtol=0, msg=key)
    # The checkpoint (written once, by rank 0) holds exactly what the fit returned.
    loaded = load_fit(two_processes / name / "checkpoint")
    for key, value in _tensors(loaded).items():
        assert torch.equal(value, ranks[0][key]), key
    assert loaded.result.steps_done == CASES[name]["config"].steps


def test_sharded_checkpoint_cuts_sub_networks_in_one_process(two_processes):
    fitted = load_fit(two_processes / "fsdp-resume" / "checkpoint")
    assert fitted.lm.lm_head.weight is fitted.lm.model.embed_tokens.weight  # still tied
    ranking = Ranking.from_guide(fitted.guide)
    windows = TokenBlocks(case_tokens(), 16).windows(limit=4)
    previous = None
    for size in (0.9, 0.6, 0.3):
        masks = ranking.masks(size)
        assert masks.kept_params <= size * masks.total_params
        if previous is not None:
            assert masks <= previous  # nested
        previous = masks
        ppl = perplexity(fitted.lm, windows.flatten(), seq_len=16, masks=masks, arch=fitted.arch)
        assert torch.isfinite(torch.tensor(ppl.ppl))
    # The sliced sub-network of the deployment path, against the masked-dense reference.
    subnetwork = pytest.importorskip("ppn_bayes.deploy.subnetwork")
    sub = subnetwork.build_subnetwork(fitted.lm, previous)
    gated = GatedLM(fitted.lm, fitted.arch)
    with torch.no_grad():
        torch.testing.assert_close(sub(input_ids=windows).logits, gated(windows, gates=previous.gates()),
                                   atol=1e-5, rtol=1e-5)
    gated.unload()


def test_two_process_checkpoint_resumes_in_one_process(two_processes, one_process, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(two_processes / "fsdp-resume" / "checkpoint-step2", checkpoint)
    config = CASES["fsdp-resume"]["config"].replace(parallel="none")
    resumed = fit(case_lm("fsdp-resume"), case_tokens(), config, checkpoint=checkpoint, resume=True,
                  progress=False)
    want = _tensors(one_process["ddp"])
    for key, value in _tensors(resumed).items():
        torch.testing.assert_close(value, want[key], atol=ATOL, rtol=0, msg=key)


def test_command_line_fit_under_torchrun(two_processes):
    run = two_processes / "cli" / "run"
    result = json.loads((run / "result.json").read_text())  # written once, by rank 0
    assert (result["world_size"], result["parallel"], result["steps_done"]) == (2, "ddp", 2)
    assert result["train_tokens"] == 2 * 2 * 2 * 16  # steps x batch x processes x seq_len
    fitted = load_fit(run / "checkpoint")
    assert fitted.result.steps_done == 2 and len(fitted.result.history) == 2


def test_resume_with_another_global_batch_is_refused(two_processes, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(two_processes / "fsdp-resume" / "checkpoint-step2", checkpoint)
    config = CASES["fsdp-resume"]["config"].replace(parallel="none", batch_size=2)  # 2 x 1, not 2 x 2
    with pytest.raises(ValueError, match="global batch of 4"):
        fit(case_lm("fsdp-resume"), case_tokens(), config, checkpoint=checkpoint, resume=True, progress=False)


# -- a single process: the restructured step against the plain loop --------------------------
def _reference_fit(lm, tokens, config: FitConfig):
    """The fit loop written out plainly: no StepLoss, no wrappers, no compiled graph, the
    objective from whole logits and autograd (objective.plain_objective), one batch a step."""
    blocks = TokenBlocks(tokens, config.seq_len, config.seed)
    from ppn_bayes.core.architecture import describe

    arch = describe(lm, mlp_group=config.mlp_group)
    original = copy.deepcopy(lm).requires_grad_(False) if config.teacher == "original" else None
    gated, model, guide, _ = build_model(lm, config, arch, prior_tokens=tokens.numel(), device=torch.device("cpu"))
    model.objective = plain_objective
    optimizer = build_optimizer(lm, guide, config)
    elbo = PuppetELBO()(model, guide)  # Trace_ELBO, its value on the device (tests/test_fit.py)
    history = []
    lm.train()
    for step in range(config.steps):
        B = config.batch_size
        sizes = step_sizes(config, step)
        groups = [0, *range(1, len(sizes) + 1)]  # the full LM, then each size, rows dealt in turn
        row_group = torch.tensor([groups[(r + step) % len(groups)] for r in range(B)])
        counts = {g: int((row_group == g).sum()) for g in groups}
        present = sum(1 for g in groups if counts[g])
        weights = torch.tensor([1.0 / (present * counts[int(g)]) for g in row_group])
        input_ids = blocks.batch(step, B)
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher_logits = (original if original is not None else lm)(input_ids=input_ids).logits
        torch.manual_seed(config.seed * 7919 + step)
        loss = elbo(input_ids, StepPlan(tuple(sizes), row_group, weights), Teacher(logits=teacher_logits))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
        optimizer.step()
        history.append({"step": step, "loss": loss.item()})
    gated.unload()
    return history, guide, lm


@pytest.mark.parametrize("teacher", ["self", "original"])
def test_single_process_fit_follows_the_plain_loop(teacher):
    """The fused, chunked objective against whole logits: float32 sums of the same terms in
    another order, so the losses agree to float32 rounding (relative 1e-6 of a loss of
    order 5 over 3 steps; 1e-4 leaves room for three steps of AdamW, whose first steps
    divide by sqrt(v) and so carry a gradient's relative rounding into the update)."""
    config = FitConfig(steps=3, batch_size=5, seq_len=12, mlp_group=32, log_every=1, n_random_sizes=2,
                       teacher=teacher, lr_lm=1e-3)
    tokens = case_tokens()
    history, guide, lm = _reference_fit(case_lm("ddp"), tokens, config)
    fitted = fit(case_lm("ddp"), tokens, config, progress=False)
    assert [row["step"] for row in fitted.result.history] == [row["step"] for row in history]
    for got, want in zip(fitted.result.history, history):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert fitted.result.world_size == 1 and fitted.result.parallel == "none"
    for key, value in guide.state_dict().items():
        torch.testing.assert_close(fitted.guide.state_dict()[key], value, atol=1e-4, rtol=1e-4, msg=key)


def test_the_compiled_step_equals_the_eager_step_bit_for_bit():
    """torch.compile's graph (aot_eager: the traced graph run by the same kernels) computes what
    the eager step does, and one graph serves every step and size: no recompiles."""
    from torch._dynamo.utils import counters

    config = FitConfig(steps=3, batch_size=4, seq_len=12, mlp_group=32, log_every=1, n_random_sizes=2,
                       teacher="original", lr_lm=1e-3)
    tokens = case_tokens()
    eager = fit(case_lm("ddp"), tokens, config, progress=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = fit(case_lm("ddp"), tokens, config.replace(compile="aot_eager"), progress=False)
    assert [r["loss"] for r in compiled.result.history] == [r["loss"] for r in eager.result.history]
    for key, value in _tensors(eager).items():
        assert torch.equal(_tensors(compiled)[key], value), key
    # One graph each: the gated LM's forward, the original teacher's, the objective's chunk.
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"] and not counters["recompiles"]


# -- the boundary ---------------------------------------------------------------------------
def test_parallel_setting_is_validated():
    with pytest.raises(ValueError, match="parallel"):
        FitConfig(parallel="zero")


def test_sharding_without_torchrun_is_refused(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for parallel in ("ddp", "fsdp"):
        with pytest.raises(ValueError, match="torchrun"):
            distributed.setup(parallel, "cpu")
    context = distributed.setup("auto", "cpu")
    assert (context.parallel, context.world_size, context.rank, context.is_main) == ("none", 1, 0, True)


def test_independent_copies_under_torchrun_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="independent"):
        distributed.setup("none", "cpu")


# -- the benchmarks, rehearsed on the CPU -----------------------------------------------------
def _benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_steady_throughput_leaves_out_the_warmup():
    steady = _benchmark("fit_scaling").steady_tokens_per_s
    assert steady([5.0, 6.0, 7.0, 8.0], 1, 100) == (300 / 3.0, 3.0)  # 3 steps after the first
    assert steady([2.0, 4.0], 0, 10) == (20 / 4.0, 4.0)  # no warm-up: every step
    assert steady([2.0, 4.0], 5, 10) == (20 / 4.0, 4.0)  # too few steps: every step


@pytest.mark.slow
def test_fit_scaling_rehearsal(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "fit_scaling.py"), "--quick", "--device", "cpu", "--gpus", "1", "2",
               "--records-dir", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "fit.jsonl").read_text().splitlines()]
    assert [r["processes"] for r in records] == [1, 2]
    assert records[1]["parallel"] == "ddp" and records[1]["max_loss_diff_vs_1gpu"] < 1e-4
    assert all(r["tokens_per_s"] > 0 and r["quick"] for r in records)


@pytest.mark.slow
def test_fit_cost_rehearsal(tmp_path):
    assert _benchmark("fit_cost").main(["--quick", "--device", "cpu", "--size-rank", "2",
                                        "--records-dir", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "fit.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["kd", "ppn_bayes", "ppn_bayes+adapters"]
    assert records[1]["ratio_vs_kd"] == pytest.approx(records[1]["tokens_per_s"] / records[0]["tokens_per_s"])
    assert records[2]["ratio_vs_plain"] == pytest.approx(records[2]["tokens_per_s"] / records[1]["tokens_per_s"])
    assert records[2]["size_rank"] == records[2]["fit_config"]["size_rank"] == 2
    assert records[1]["fit_config"]["size_rank"] == 0
    assert records[0]["train_tokens"] == records[1]["train_tokens"] == records[2]["train_tokens"] == 4 * 4 * 32
