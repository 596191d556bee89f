"""Checkpoints: an interrupted fit resumes to exactly the uninterrupted result, and a bad
checkpoint is refused with a clear ``FileFormatError`` before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_lm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from ppn_bayes.core.config import FitConfig
from ppn_bayes.data import TokenBlocks
from ppn_bayes.fit import fit, load_fit, read_state
from ppn_bayes.io import FileFormatError

CONFIG = FitConfig(steps=6, batch_size=2, seq_len=12, mlp_group=32, log_every=1, n_random_sizes=1,
                   lr_lm=1e-3, checkpoint_every=3)
TOKENS = torch.randint(0, 97, (400,), generator=torch.Generator().manual_seed(5))
FILES = ("guide.safetensors", "optimizer.safetensors", "lm/model.safetensors")


class Interrupted(RuntimeError):
    pass


class StopsAt(TokenBlocks):
    """Token blocks that fail when asked for the batch of step ``stop``: a crash mid-fit."""

    stop: int = -1

    def batch(self, step, batch_size, **kwargs):
        if step == self.stop:
            raise Interrupted(f"stopped at step {step}")
        return super().batch(step, batch_size, **kwargs)


def _state(fitted) -> dict[str, torch.Tensor]:
    out = {f"guide.{k}": v for k, v in fitted.guide.state_dict().items()}
    out.update({f"lm.{k}": v for k, v in fitted.lm.state_dict().items()})
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("whole") / "checkpoint"
    return fit(tiny_lm("llama"), TOKENS, CONFIG, checkpoint=path, progress=False), path


@pytest.fixture()
def checkpoint(uninterrupted, tmp_path):
    """A copy of a finished fit's checkpoint, to damage."""
    path = tmp_path / "checkpoint"
    shutil.copytree(uninterrupted[1], path)
    return path


def _interrupted(path: Path) -> Path:
    """The checkpoint of a fit that crashed at step 4 (its last checkpoint: step 3)."""
    blocks = StopsAt(TOKENS, CONFIG.seq_len, CONFIG.seed)
    object.__setattr__(blocks, "stop", 4)
    with pytest.raises(Interrupted):
        fit(tiny_lm("llama"), blocks, CONFIG, checkpoint=path, progress=False)
    return path


def test_interrupted_fit_resumes_to_exactly_the_uninterrupted_one(uninterrupted, tmp_path):
    whole, whole_path = uninterrupted
    path = _interrupted(tmp_path / "checkpoint")
    assert read_state(path)["step"] == 3  # the last checkpoint before the crash
    resumed = fit(tiny_lm("llama"), TOKENS, CONFIG, checkpoint=path, resume=True, progress=False)
    assert resumed.result.history == whole.result.history
    want = _state(whole)
    for key, value in _state(resumed).items():
        assert torch.equal(value, want[key]), key
    # The optimizer's moments too: a later resume continues the same way.
    a, b = load_file(path / "optimizer.safetensors"), load_file(whole_path / "optimizer.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_fit_returns_what_fit_returned(uninterrupted):
    whole, path = uninterrupted
    loaded = load_fit(path)
    want = _state(whole)
    for key, value in _state(loaded).items():
        assert torch.equal(value, want[key]), key
    assert loaded.result.history == whole.result.history
    assert read_state(path)["world_size"] == 1


def _resume(path, lm=None, config=CONFIG):
    return fit(lm if lm is not None else tiny_lm("llama"), TOKENS, config, checkpoint=path, resume=True,
               progress=False)


def test_checkpoint_of_another_model_is_refused(checkpoint):
    before = _snapshot(checkpoint)
    with pytest.raises(FileFormatError, match="another model"):
        _resume(checkpoint, tiny_lm("llama", num_hidden_layers=2))
    assert _snapshot(checkpoint) == before


def test_other_settings_are_refused(checkpoint):
    with pytest.raises(ValueError, match="other settings"):
        _resume(checkpoint, config=CONFIG.replace(lr_guide=0.1))
    with pytest.raises(ValueError, match="global batch"):
        _resume(checkpoint, config=CONFIG.replace(batch_size=4))


def test_the_fit_reports_its_checkpoints_size(uninterrupted):
    fitted, path = uninterrupted
    sizes = fitted.result.checkpoint_bytes
    assert sizes["optimizer"] == (path / "optimizer.safetensors").stat().st_size > 0
    assert sizes["total"] == sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert sizes["total"] >= sizes["lm"] + sizes["guide"] + sizes["optimizer"] + sizes["state"]


def test_a_fit_far_too_short_for_its_lm_says_so():
    from ppn_bayes.train.loop import TrainingBudgetWarning

    with pytest.warns(TrainingBudgetWarning, match="per parameter of the LM"):
        fit(tiny_lm("llama"), TOKENS, CONFIG.replace(steps=1, checkpoint_every=0), progress=False)


def test_a_resume_with_other_data_is_refused(checkpoint):
    before = _snapshot(checkpoint)
    with pytest.raises(ValueError, match="data differs.*sha256"):
        fit(tiny_lm("llama"), TOKENS.flip(0), CONFIG, checkpoint=checkpoint, resume=True, progress=False)
    assert _snapshot(checkpoint) == before


def test_a_resume_cannot_go_back_to_fewer_steps(checkpoint):
    before = _snapshot(checkpoint)
    with pytest.raises(ValueError, match="cannot go back to steps=4"):
        _resume(checkpoint, config=CONFIG.replace(steps=4))
    assert _snapshot(checkpoint) == before


def test_a_mixture_resumes_only_with_its_weights(tmp_path):
    """A fit on two sources records both with their weights; other weights are other data."""
    from ppn_bayes.store import Mixture

    config = CONFIG.replace(steps=2, checkpoint_every=0)
    halves = (TOKENS[:200], TOKENS[200:])
    fit(tiny_lm("llama"), Mixture(halves, [0.5, 0.5], seq_len=config.seq_len), config, checkpoint=tmp_path / "c",
        progress=False)
    state = read_state(tmp_path / "c")
    assert [s["weight"] for s in state["data"]["sources"]] == [0.5, 0.5]
    with pytest.raises(ValueError, match="weight"):
        fit(tiny_lm("llama"), Mixture(halves, [0.9, 0.1], seq_len=config.seq_len), config.replace(steps=3),
            checkpoint=tmp_path / "c", resume=True, progress=False)


@pytest.mark.parametrize("change, message", [
    ({"format_version": 99}, "version 99"),
    ({"format": "something else"}, "not a ppn_bayes checkpoint"),
    ({"architecture": {"n_layers": 3}}, "architecture"),
])
def test_other_format_is_refused(checkpoint, change, message):
    state = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps({**state, **change}))
    before = _snapshot(checkpoint)
    with pytest.raises(FileFormatError, match=message):
        _resume(checkpoint)
    with pytest.raises(FileFormatError, match=message):
        load_fit(checkpoint)
    assert _snapshot(checkpoint) == before


def test_state_that_is_not_json_is_refused(checkpoint):
    (checkpoint / "state.json").write_text('{"format": "ppn_bayes.checkpoint", "step": ')
    with pytest.raises(FileFormatError, match="not valid JSON"):
        _resume(checkpoint)


@pytest.mark.parametrize("name", FILES)
def test_truncated_tensors_are_refused(checkpoint, name):
    file = checkpoint / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    before = _snapshot(checkpoint)
    lm = tiny_lm("llama")
    with pytest.raises(FileFormatError, match=name.split("/")[-1]):
        _resume(checkpoint, lm)
    assert _snapshot(checkpoint) == before
    hooks = [m for m in lm.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks, "a refused resume left gate hooks on the LM"


@pytest.mark.parametrize("name", FILES)
def test_missing_file_is_refused(checkpoint, name):
    (checkpoint / name).unlink()
    with pytest.raises(FileFormatError, match="missing"):
        _resume(checkpoint)
    if name != "optimizer.safetensors":  # load_fit needs no optimizer
        with pytest.raises(FileFormatError, match="missing"):
            load_fit(checkpoint)


def test_no_checkpoint_to_resume(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _resume(tmp_path / "nothing")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(min_value=0.0, max_value=0.999))
def test_guide_cut_anywhere_is_refused(checkpoint, fraction):
    file = checkpoint / "guide.safetensors"
    whole = (checkpoint.parent / "guide.bytes")
    if not whole.exists():
        whole.write_bytes(file.read_bytes())
    data = whole.read_bytes()
    file.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(FileFormatError, match="guide.safetensors"):
        load_fit(checkpoint)


def test_a_resume_may_split_the_global_batch_into_micro_batches(uninterrupted, tmp_path):
    """A checkpoint of batch 2 resumes as 1 sequence x accumulate 2: the same global batch,
    so the same steps up to float rounding."""
    whole, _ = uninterrupted
    path = _interrupted(tmp_path / "checkpoint")
    resumed = _resume(path, config=CONFIG.replace(batch_size=1, accumulate=2))
    for a, b in zip(resumed.result.history, whole.result.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    want = _state(whole)
    for key, value in _state(resumed).items():
        torch.testing.assert_close(value, want[key], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="global batch of 2 sequences"):
        _resume(path, config=CONFIG.replace(batch_size=2, accumulate=2))


def test_the_held_out_record_survives_a_resume(tmp_path):
    held_out = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(6))
    config = CONFIG.replace(eval_every=2, eval_windows=2)
    whole = fit(tiny_lm("llama"), TOKENS, config, checkpoint=tmp_path / "whole", progress=False,
                eval_tokens=held_out)
    blocks = StopsAt(TOKENS, CONFIG.seq_len, CONFIG.seed)
    object.__setattr__(blocks, "stop", 4)
    with pytest.raises(Interrupted):
        fit(tiny_lm("llama"), blocks, config, checkpoint=tmp_path / "cut", progress=False, eval_tokens=held_out)
    assert [row["step"] for row in read_state(tmp_path / "cut")["validation"]] == [2]
    resumed = fit(tiny_lm("llama"), TOKENS, config, checkpoint=tmp_path / "cut", resume=True, progress=False,
                  eval_tokens=held_out)
    assert resumed.result.validation == whole.result.validation
    assert [row["step"] for row in whole.result.validation] == [2, 4, 6]
    assert load_fit(tmp_path / "cut").result.validation == whole.result.validation


def test_a_fit_taught_by_the_original_resumes_from_the_original_only(tmp_path):
    """teacher='original': the checkpoint names the weights the fit started from; a resume
    given those weights ends where the uninterrupted fit ends, other weights are refused."""
    config = CONFIG.replace(teacher="original")
    whole = fit(tiny_lm("llama"), TOKENS, config, checkpoint=tmp_path / "whole", progress=False)
    blocks = StopsAt(TOKENS, config.seq_len, config.seed)
    object.__setattr__(blocks, "stop", 4)
    path = tmp_path / "checkpoint"
    with pytest.raises(Interrupted):
        fit(tiny_lm("llama"), blocks, config, checkpoint=path, progress=False)
    state = read_state(path)
    assert state["step"] == 3 and len(state["teacher_fingerprint"]) == 64
    before = _snapshot(path)
    other = tiny_lm("llama")
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="teacher='original' from other weights"):
        _resume(path, other, config)
    assert _snapshot(path) == before
    resumed = _resume(path, config=config)
    assert resumed.result.history == whole.result.history
    want = _state(whole)
    for key, value in _state(resumed).items():
        assert torch.equal(value, want[key]), key


def test_the_original_teacher_differs_from_self_distillation_and_is_refused_with_fsdp():
    config = CONFIG.replace(steps=3, checkpoint_every=0)
    self_taught = fit(tiny_lm("llama"), TOKENS, config, progress=False)
    original = fit(tiny_lm("llama"), TOKENS, config.replace(teacher="original"), progress=False)
    assert self_taught.result.history[0] == original.result.history[0]  # the first step's teachers agree
    assert self_taught.result.history[-1]["loss"] != original.result.history[-1]["loss"]
    with pytest.raises(ValueError, match="parallel='fsdp'"):
        fit(tiny_lm("llama"), TOKENS, config.replace(teacher="original", parallel="fsdp"), progress=False)
    with pytest.raises(ValueError, match="teacher must be one of"):
        FitConfig(teacher="dense")
