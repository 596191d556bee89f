"""Self-distillation fine-tune of one chosen sub-network: the optional step after a fit.

A fit yields every size at once, without further computation. When one size is chosen
for deployment, a short fine-tune of that sub-network alone, towards the full LM, recovers
much of what the cut lost: on SmolLM2-135M, the fit of record's sub-network at size 0.5
went from perplexity 303 to 112 with as many tokens again as the fit
(docs/benchmarks.md, "ppn_bayes + self-distillation of the chosen size").

The objective is the fit's likelihood for one sub-network: the student's next-token loss
plus ``distill_weight`` · KL(teacher ‖ student) per token, the teacher's distribution
over the whole vocabulary, with AdamW. Windows are drawn as the fit draws them
(:class:`~ppn_bayes.data.TokenBlocks`, a pure function of ``(seed, step)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.budget import Budget
from ..core.config import COMPILERS, check_compiler, check_fields, setting
from ..data import TokenBlocks, check_token_ids
from ..lm import check_same_vocabulary, vocab_rows
from ..core.objective import Teacher, fused_objective
from ..core.schedule import SCHEDULES, check_schedule, lr_factor
from ..transfer import Readback, to_device

__all__ = ["DistillConfig", "DistillResult", "distill", "distill_checkpoint"]


@dataclass(frozen=True)
class DistillConfig:
    """Settings of :func:`distill`. Each field's metadata (:func:`~ppn_bayes.core.config.setting`)
    holds its help text and its bound, from which ``ppn-bayes distill`` builds its flags, and
    whether it changes what the fine-tune computes (a resume may change those that do not,
    and ``steps``)."""

    steps: int = setting(200, "optimisation", "steps", bound="positive")
    batch_size: int = setting(8, "optimisation", "windows per step", bound="positive")
    seq_len: int = setting(512, "optimisation", "tokens per window", bound="positive")
    lr: float = setting(3e-5, "optimisation", "AdamW learning rate", bound="positive")
    weight_decay: float = setting(0.0, "optimisation", "AdamW weight decay", bound="nonnegative")
    adam_beta2: float = setting(0.999, "optimisation", "AdamW's beta2 (the decay of its average of squared "
                                "gradients; 0.95 in many distillation recipes)", bound="decay")
    distill_weight: float = setting(1.0, "objective", "weight of the KL term; 0: plain fine-tuning",
                                    bound="nonnegative")
    grad_clip: float = setting(1.0, "optimisation", "gradient-norm clipping; 0: none", bound="nonnegative")
    seed: int = setting(0, "run", "seed of the windows")
    log_every: int = setting(10, "run", "log the losses every this many steps", bound="positive",
                             identifies=False)
    checkpoint_every: int = setting(0, "run", "checkpoint to OUT.distill-checkpoint every this many steps "
                                    "(0: never)", bound="nonnegative", identifies=False)
    nll_weight: float = setting(1.0, "objective", "weight of the next-token loss; 0: the KL term alone",
                                bound="nonnegative")
    lr_schedule: str = setting("constant", "optimisation", "'constant', or 'cosine': after the warm-up a half "
                               "cosine down to a tenth of --lr", choices=SCHEDULES)
    warmup_steps: int = setting(0, "optimisation", "the rate rises linearly over this many first steps",
                                bound="nonnegative")
    compile: str = setting("none", "run", "torch.compile backend of both LMs' decoder bodies and of the "
                           "objective's chunks ('inductor' on a GPU; 'none': eager)", choices=COMPILERS,
                           identifies=False)

    def __post_init__(self):
        check_fields(self)  # types, and no NaN or infinity anywhere
        for name in ("steps", "batch_size", "lr", "log_every"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        for name in ("weight_decay", "distill_weight", "grad_clip", "checkpoint_every", "nll_weight", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.adam_beta2 < 1:
            raise ValueError(f"adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        check_schedule(self.lr_schedule)
        check_compiler(self.compile)
        if self.nll_weight == 0 and self.distill_weight == 0:
            raise ValueError("nll_weight and distill_weight are both 0: the loss would be empty")

    def replace(self, **changes) -> "DistillConfig":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The settings as plain JSON-ready data."""
        return dataclasses.asdict(self)


@dataclass
class DistillResult:
    """What a fine-tune did: its steps and the tokens the student saw, the time of this
    call, and the logged losses (``history`` rows ``{step, loss, nll, kl}``, per token).
    ``stopped_at``: the step a ``stop_after`` deadline ended this call at, with a checkpoint
    there (``None``: the fine-tune ran to its end)."""

    steps: int
    train_tokens: int
    seconds: float
    tokens_per_s: float
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    stopped_at: int | None = None

    def to_dict(self) -> dict:
        """The result as plain JSON-ready data."""
        return dataclasses.asdict(self)


CHECKPOINT_FORMAT = "ppn_bayes.distill-checkpoint"
#: Settings a resumed fine-tune may change: those that do not alter the steps it takes, and
#: ``steps`` (not under a cosine schedule: checked in :func:`_resume`).
_RESUMABLE_CHANGES = ("steps",) + tuple(f.name for f in dataclasses.fields(DistillConfig)
                                        if not f.metadata["identifies"])


def _save_checkpoint(path, student: nn.Module, optimizer, step: int, config: DistillConfig,
                     history: list[dict]) -> None:
    """Student weights and AdamW state (safetensors) and the rest (JSON), as one directory
    replaced atomically."""
    import json

    from safetensors.torch import save_file, save_model

    from ..optim_state import optimizer_tensors
    from ..io import atomic_directory

    opt_state = optimizer.state_dict()
    with atomic_directory(path, overwrite=True) as tmp:
        save_model(student, str(tmp / "student.safetensors"))  # tied weights stored once
        save_file(optimizer_tensors(opt_state), str(tmp / "optimizer.safetensors"))
        state = {"format": CHECKPOINT_FORMAT, "version": 1, "step": step, "config": config.to_dict(),
                 "history": history, "optimizer_groups": opt_state["param_groups"]}
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def _resume(path, student: nn.Module, optimizer, config: DistillConfig) -> tuple[int, list[dict]]:
    """Load a checkpoint of :func:`_save_checkpoint` into ``student`` and ``optimizer``;
    refuse one of other settings or another sub-network."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from ..optim_state import read_optimizer, restore_optimizer
    from ..io import FileFormatError, read_json

    path = Path(path)
    state = read_json(path / "state.json", "distill checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(f"{path} is not a distill checkpoint (format {state.get('format')!r})")
    try:
        saved = DistillConfig(**state["config"])
    except (TypeError, ValueError) as err:
        raise FileFormatError(f"{path}/state.json: unreadable settings ({err})") from None
    if saved.replace(**{k: getattr(config, k) for k in _RESUMABLE_CHANGES}) != config:
        raise ValueError(f"distill checkpoint {path} was made with other settings: {saved}")
    if config.lr_schedule == "cosine" and saved.steps != config.steps:
        raise ValueError(f"distill checkpoint {path} runs a cosine schedule over {saved.steps} steps; "
                         f"steps={config.steps} would bend it: resume with steps={saved.steps}")
    try:
        missing, unexpected = load_model(student, str(path / "student.safetensors"), strict=False)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise FileFormatError(f"{path}/student.safetensors does not fit this sub-network ({err})") from None
    if missing or unexpected:
        raise FileFormatError(f"{path}/student.safetensors does not fit this sub-network "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    restore_optimizer(optimizer, read_optimizer(path, state), path)
    return int(state["step"]), list(state["history"])


def _bodies(student: nn.Module, teacher: nn.Module, backend: str) -> tuple:
    """The decoder bodies (the LMs without their heads) of ``student`` and ``teacher``,
    compiled with ``backend`` unless it is ``'none'`` (one static shape: every batch is
    ``[batch_size, seq_len]``)."""
    bodies = tuple(getattr(lm, lm.base_model_prefix) for lm in (student, teacher))
    if backend == "none":
        return bodies
    return tuple(torch.compile(body, dynamic=False, backend=backend) for body in bodies)


def _distill_loss(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, config: DistillConfig,
                  bodies: tuple):
    """``(loss, nll, kl)`` of one batch ``[B, T]``: ``nll_weight`` · the student's mean
    next-token NLL + ``distill_weight`` · the mean KL(teacher ‖ student) per token, from the
    two LMs' final hidden states and heads in chunks (:func:`~ppn_bayes.core.objective.fused_objective`:
    no ``[B, T, V]`` logits are held; the same objective as the fit's). ``bodies``: the two
    decoder bodies to run (:func:`_bodies`)."""
    student_body, teacher_body = bodies
    B = input_ids.shape[0]
    taught = None
    if config.distill_weight > 0:
        with torch.no_grad():
            hidden = teacher_body(input_ids=input_ids, use_cache=False)
            taught = Teacher(hidden=hidden.last_hidden_state, head=teacher.get_output_embeddings().weight)
    hidden = student_body(input_ids=input_ids, use_cache=False).last_hidden_state
    weights = torch.full((B,), 1.0 / B, device=input_ids.device)  # every row alike: the batch mean
    loss, rows = fused_objective(hidden, student.get_output_embeddings().weight, input_ids, weights, taught,
                                 nll_weight=config.nll_weight, kl_weight=config.distill_weight,
                                 compile=config.compile)
    return loss, rows.nll.mean(), rows.kl.mean()


def distill(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor | TokenBlocks,
            config: DistillConfig = DistillConfig(), *, autocast=None, progress: bool = True,
            checkpoint=None, resume: bool = False, stop_after: float | None = None) -> DistillResult:
    """Fine-tune ``student`` (a sub-network, trained in place) towards ``teacher`` (left
    unchanged) on ``tokens`` (1-D token tensor, or :class:`~ppn_bayes.data.TokenBlocks` of
    ``config.seq_len``).

    ``autocast``: a context manager factory wrapped around both forward passes (e.g.
    ``lambda: torch.autocast("cuda", torch.bfloat16)``); ``None`` runs in the weights'
    dtype. The student ends in eval mode. Raises ``ValueError`` when the two LMs do not
    share a vocabulary or the tokens fall outside it.

    With ``checkpoint`` (a directory) the student's weights, AdamW's state and the losses
    are written there every ``config.checkpoint_every`` steps (replaced atomically; never
    with ``checkpoint_every=0``, unless ``stop_after`` stops the run);
    ``resume=True`` continues from it. Windows are a pure function of the step, so a
    resumed fine-tune ends where an uninterrupted one does (``result.resumed_from`` names
    the step it started at; ``seconds`` and ``tokens_per_s`` are this call's).
    ``stop_after`` (seconds, needs ``checkpoint``): stop at the first step boundary after
    this long, with a checkpoint there (``result.stopped_at``), for machines lent in stretches.

    The host never waits for the device within a step: batches are copied from page-locked
    memory, and the logged losses are read back one logged step late, so a non-finite loss
    stops the fine-tune at the next logged step (or the end), naming the step it came from.
    """
    if stop_after is not None and not stop_after > 0:
        raise ValueError(f"stop_after must be a positive number of seconds, got {stop_after}")
    if stop_after is not None and checkpoint is None:
        raise ValueError("stop_after needs the checkpoint directory to stop into")
    check_same_vocabulary(teacher, student, names=("teacher", "student"), why="distillation needs one vocabulary")
    blocks = tokens if hasattr(tokens, "batch") else TokenBlocks(torch.as_tensor(tokens), config.seq_len,
                                                                 config.seed)
    if blocks.seq_len != config.seq_len:
        raise ValueError(f"token blocks of {blocks.seq_len} tokens, but config.seq_len={config.seq_len}")
    if isinstance(blocks, TokenBlocks):  # a token store checks its own ids when it opens
        check_token_ids(blocks.tokens, vocab_rows(student), "the training tokens")
    autocast = autocast or contextlib.nullcontext
    device = next(student.parameters()).device
    teacher_was_training = teacher.training
    teacher.eval()
    # one fused kernel a step on a GPU, as the fit's optimizer (a distillation step is host-bound there)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, config.adam_beta2), fused=device.type == "cuda")
    from tqdm.auto import tqdm

    history: list[dict] = []
    start = 0
    if resume:
        if checkpoint is None:
            raise ValueError("resume=True needs the checkpoint directory")
        start, history = _resume(checkpoint, student, optimizer, config)
    student.train()
    bodies = _bodies(student, teacher, config.compile)
    began = time.perf_counter()
    deadline = None if stop_after is None else time.monotonic() + stop_after
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress,
               desc="distill", unit="step")
    log = _Losses(history, bar)
    stopped = None
    try:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(config.lr_schedule, step, config.steps, config.warmup_steps)
            input_ids = to_device(blocks.batch(step, config.batch_size), device)  # [B, T]
            with autocast():
                loss, nll, kl = _distill_loss(student, teacher, input_ids, config, bodies)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            optimizer.step()
            if step % config.log_every == 0 or step == config.steps - 1:
                log.push(step, torch.stack([loss, nll, kl]).detach().float())
            done = step + 1
            late = deadline is not None and done < config.steps and time.monotonic() > deadline
            if checkpoint is not None and done < config.steps and (
                    late or (config.checkpoint_every and done % config.checkpoint_every == 0)):
                log.flush()
                _save_checkpoint(checkpoint, student, optimizer, done, config, history)
            if late:
                stopped = done
                break
        log.flush()
    finally:
        bar.close()
        student.eval()
        teacher.train(teacher_was_training)
    seconds = time.perf_counter() - began
    tokens_here = ((config.steps if stopped is None else stopped) - start) * config.batch_size * config.seq_len
    return DistillResult(steps=config.steps, train_tokens=config.steps * config.batch_size * config.seq_len,
                         seconds=seconds, tokens_per_s=tokens_here / seconds if seconds > 0 else 0.0,
                         history=history, resumed_from=start, stopped_at=stopped)


class _Losses:
    """The logged steps' ``[loss, nll, kl]``, read back one logged step late from a copy
    the device makes on its own (an event marks it done), into ``history`` and the bar."""

    def __init__(self, history: list[dict], bar):
        self.history, self.bar, self.pending = history, bar, None

    def push(self, step: int, figures: torch.Tensor) -> None:
        figures = Readback(figures)  # queued before the wait for the logged step before
        self.flush()
        self.pending = (step, figures)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, figures = self.pending
        self.pending = None
        values = figures.tolist()
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"the loss became {values[0]} at step {step}; lower lr")
        self.history.append({"step": step, "loss": values[0], "nll": values[1], "kl": values[2]})
        self.bar.set_postfix(loss=f"{values[0]:.3f}", kl=f"{values[2]:.3f}")


def distill_checkpoint(checkpoint, data, out, *, size: float | None = None, n_params: int | None = None,
                       teacher=None, config: DistillConfig = DistillConfig(), eval_data=None,
                       eval_windows: int = 16, device: str | torch.device = "cpu", bf16: bool = False,
                       overwrite: bool = False, progress: bool = True, resume: bool = False,
                       stop_after: float | None = None) -> dict:
    """Cut the sub-network of ``size`` (or ``n_params``) from a fit or ranked ``checkpoint``,
    fine-tune it by :func:`distill` on ``data`` (text, or a ``.safetensors`` token file)
    and save it to ``out`` (:func:`~ppn_bayes.deploy.subnetwork.save_subnetwork`, atomically, with
    ``distill.json``: settings, losses, and with ``eval_data`` the held-out perplexity of
    the sub-network before and after on its first ``eval_windows`` windows of ``seq_len``).

    The teacher is the checkpoint's full LM unless ``teacher`` names another model (any
    path :func:`~ppn_bayes.deploy.artifacts.open_model` opens, e.g. the original pretrained LM).
    ``bf16`` runs the forward passes under bfloat16 autocast on CUDA. Returns the report
    that ``distill.json`` holds.

    With ``config.checkpoint_every`` the fine-tune checkpoints to ``<out>.distill-checkpoint``
    beside ``out`` (removed once ``out`` is written); ``resume=True`` continues from there.
    ``stop_after`` (seconds) stops the fine-tune at the first step after this long with a
    checkpoint there and writes no ``out``: the report then holds ``stopped_at`` (the step)
    and ``resume_from`` (the checkpoint), and the same call with ``resume=True`` goes on.
    """
    import shutil
    from pathlib import Path

    from ..data import load_tokens
    from ..inspect.evaluate import perplexity
    from ..train import versions
    from .artifacts import checkpoint_kind, open_model
    from .subnetwork import decoder_params, save_subnetwork

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    Budget(size, n_params)  # checked before any work
    if stop_after is not None and not stop_after > 0:
        raise ValueError(f"stop_after must be a positive number of seconds, got {stop_after}")
    if eval_windows < 1:
        raise ValueError(f"eval_windows must be positive, got {eval_windows}")
    work = out.with_name(out.name + ".distill-checkpoint")
    if resume and not (work / "state.json").is_file():
        raise FileNotFoundError(f"no distill checkpoint to resume at {work}")
    if not resume and (config.checkpoint_every or stop_after is not None) and work.exists():
        raise FileExistsError(f"a distill checkpoint of an earlier run is at {work}: pass resume=True (--resume) "
                              "to continue it, or remove it")
    kind = checkpoint_kind(checkpoint)
    if kind not in ("fit", "ranked"):
        raise ValueError(f"{checkpoint} is a {kind}, not a fit or ranked checkpoint: the sub-network is cut by "
                         "the checkpoint's ranking")
    device = torch.device(device)
    if bf16 and device.type != "cuda":
        raise ValueError("bf16 autocast is for CUDA devices; on the CPU the fine-tune runs in float32")
    student = open_model(checkpoint, size=size, n_params=n_params, device=device)
    if teacher is None:
        full = open_model(checkpoint, size=1.0 if kind == "ranked" else None, device=device)
    else:
        full = open_model(teacher, device=device)
    tokenizer = student.tokenizer or full.tokenizer
    tokens = load_tokens(data, tokenizer)
    held_out = load_tokens(eval_data, tokenizer) if eval_data is not None else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else None

    def evaluate() -> float:
        result = perplexity(student.lm, held_out, seq_len=config.seq_len, batch_size=config.batch_size,
                            limit=eval_windows)
        return result.ppl

    before = evaluate() if held_out is not None else None
    result = distill(student.lm, full.lm, tokens, config, autocast=autocast, progress=progress,
                     checkpoint=work, resume=resume, stop_after=stop_after)
    if result.stopped_at is not None:
        return {"format": "ppn_bayes.distill", "version": 1, "checkpoint": str(checkpoint),
                "stopped_at": result.stopped_at, "resume_from": str(work), "result": result.to_dict()}
    after = evaluate() if held_out is not None else None
    report = {
        "format": "ppn_bayes.distill", "version": 1, "checkpoint": str(checkpoint),
        "teacher": str(teacher) if teacher is not None else f"{checkpoint} (full LM)",
        "data": str(data), "size_requested": size, "n_params_requested": n_params,
        "size_reached": student.masks.size_reached, "decoder_params": decoder_params(student.lm),
        "config": config.to_dict(), "bf16": bf16, "result": result.to_dict(), "versions": versions(),
    }
    if held_out is not None:
        report["eval"] = {"data": str(eval_data), "windows": eval_windows, "seq_len": config.seq_len,
                          "ppl_before": before, "ppl_after": after}
    save_subnetwork(student.lm, tokenizer, out, overwrite=overwrite, extra_json={"distill.json": report})
    shutil.rmtree(work, ignore_errors=True)  # its work is in out now
    return report
