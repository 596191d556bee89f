"""Speculative-decoding benchmark: ppn_bayes sub-networks as drafts for their target.

The protocol of BENCHMARKS.md: greedy decoding at batch 1; for every draft size and draft
length ``k``, the acceptance rate, the tokens emitted per target pass, tokens/s against
plain greedy decoding of the target measured first in the same run (``ratio_vs_target``),
and whether the output equals plain greedy decoding token for token. GPU: bf16,
``torch.compile`` with CUDA graphs (``mode="reduce-overhead"``), static KV caches
(:class:`ppn_bayes.generation.Decoder`); the identity of the outputs is also checked in
float32 (``identical_output_fp32``), since bf16 rounding differs between a one-token pass
and a ``k + 1``-token pass. CPU: float32, eager, 2 threads.

Where the drafts come from (no pyro or arviz needed for the first three):

* ``--model RANKED`` a ranked checkpoint (``ppn-bayes export-ranked``): the fitted LM read
  in rank order, and its ranking; ``--shared`` also times drafts whose weights are views
  of the target's (no copy) and records the bytes they add;
* ``--model LM --rankings rankings.json [--method ppn_bayes]`` a Hugging Face directory or
  ``.gguf`` file cut by a ranking of the rankings file ``benchmarks/quality.py`` writes
  (on the GPU: ``<work>/fits/ppn_bayes/lm`` and ``<work>/rankings.json``);
* ``--model LM --masks masks.json`` a mask file (``ppn-bayes masks``);
* ``--model LM --method magnitude`` units ranked by weight magnitude, no training (a
  baseline: what an untrained cut of the same size accepts);
* ``--model CHECKPOINT`` a fit checkpoint (loads pyro).

The target is the full network of ``--model`` (the draft's own weights, all units kept),
or ``--target PATH`` (e.g. the dense model the fit started from).

Every measured pair is appended to ``speculative.jsonl`` as soon as it is measured.
Compiled runs pad every verification to ``max(ks) + 1`` tokens (``verify_len`` in the
records), so one target graph serves every ``k``; ``--time-budget`` stops starting new
sizes.

Examples::

    # CPU smoke run with SmolLM2 (the drafts cut by --rankings; --method magnitude needs none):
    python benchmarks/speculative.py --model "$(../shared/tools/smollm2)" --rankings rankings.json --quick \
        --threads 1
    # H200:
    python benchmarks/speculative.py --model $WORK/fits/ppn_bayes/lm --rankings $WORK/rankings.json \\
        --data $TEXTS/wiki.test.raw --records-dir $OUT/records --time-budget 400
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ppn_bayes.records import RECORDS_DIR, append_record

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import RECORD, SPECULATIVE_QUICK_SIZES, SPECULATIVE_SIZES, listed  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KS = (2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class SpeculativeConfig:
    """What one run of the benchmark measures."""

    model: str
    target: str | None = None
    rankings: str | None = None
    method: str = RECORD
    masks: str | None = None
    sizes: tuple[float, ...] = SPECULATIVE_SIZES
    ks: tuple[int, ...] = KS
    data: str | None = None
    n_prompts: int = 4
    prompt_len: int = 32
    new_tokens: int = 256
    repeats: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    compile_backend: str = "inductor"
    shared: bool = False
    fp32_check_tokens: int = 64
    threads: int | None = None
    records_dir: str = str(RECORDS_DIR)
    out: str | None = None
    model_name: str | None = None
    time_budget: float | None = None
    quick: bool = False

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        for name in ("n_prompts", "prompt_len", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.sizes or not self.ks or min(self.ks) < 1:
            raise ValueError("give at least one size and draft lengths k >= 1")
        if self.rankings is not None and self.masks is not None:
            raise ValueError("give a rankings file or a mask file, not both")

    @property
    def name(self) -> str:
        """The model's name in records."""
        return self.model_name or Path(self.model).name.split(".")[0]


# -- inputs -------------------------------------------------------------------------------------
def open_target(config: SpeculativeConfig):
    """A :class:`ppn_bayes.speculative.Target`: the LM to cut drafts from and their ranking."""
    from ppn_bayes.lm import load_lm
    from ppn_bayes.deploy.artifacts import checkpoint_kind
    from ppn_bayes.decode.speculative import Target, load_target, rank_sorted

    dtype = torch.float32  # cut in float32; cast to the benchmark's dtype afterwards
    if config.rankings is None and config.masks is None and config.method == "magnitude":
        from ppn_bayes.inspect.baselines import magnitude_ranking

        lm, tokenizer = load_lm(config.model, dtype=dtype)
        ranking = magnitude_ranking(lm)
        if config.shared:
            lm, ranking = rank_sorted(lm, ranking)
        return Target(lm.eval(), ranking, tokenizer, "hf", ranked=config.shared)
    if config.rankings is None:
        return load_target(config.model, masks_file=config.masks, dtype=dtype, rank=config.shared)
    if checkpoint_kind(config.model) not in ("hf", "gguf"):
        raise ValueError("--rankings cuts a Hugging Face directory or a .gguf file; give such a --model")
    from speed import load_ranking  # the rankings file of benchmarks/quality.py

    lm, tokenizer = load_lm(config.model, dtype=dtype)
    ranking = load_ranking(config.rankings, config.method, lm)
    if config.shared:
        lm, ranking = rank_sorted(lm, ranking)
    return Target(lm.eval(), ranking, tokenizer, "hf", ranked=config.shared)


def read_prompts(config: SpeculativeConfig, tokenizer, vocab_size: int) -> list[torch.Tensor]:
    """``n_prompts`` prompts of ``prompt_len`` tokens, evenly spaced through ``--data``
    (seeded random ids when there is no text or no tokenizer)."""
    from ppn_bayes.data import load_tokens
    from ppn_bayes.decode.speculative import prompts_from_tokens

    if config.data and Path(config.data).is_file() and (tokenizer is not None or config.data.endswith(".safetensors")):
        if config.data.endswith(".safetensors"):
            tokens = load_tokens(config.data)
        else:
            text = Path(config.data).read_text(encoding="utf-8")[:400_000]
            tokens = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
        return prompts_from_tokens(tokens, n_prompts=config.n_prompts, prompt_len=config.prompt_len)
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (config.prompt_len,), generator=generator) for _ in range(config.n_prompts)]


# -- the float32 identity check -------------------------------------------------------------------
class Fp32Check:
    """Whether greedy speculation equals plain greedy decoding in float32 (eager), on the
    first prompts: the exactness check, apart from the timed run's dtype (bf16 rounds a
    one-token pass and a ``k + 1``-token pass differently). The float32 target, its plain
    outputs and each size's float32 draft are made once."""

    def __init__(self, target_lm, prompts, new_tokens: int, max_k: int, device):
        import copy

        from ppn_bayes.decode.generation import Decoder

        self.prompts = [p[None] for p in prompts]
        self.new_tokens = new_tokens
        self.max_len = max(p.shape[1] for p in self.prompts) + new_tokens + max_k + 1
        self.device = device
        target32 = copy.deepcopy(target_lm).to(device=device, dtype=torch.float32)
        self.target = Decoder(target32, max_len=self.max_len)
        self.plain = [self.target.generate(p, new_tokens).cpu() for p in self.prompts]
        self.drafts: dict[float, object] = {}

    def __call__(self, size: float, draft_lm, k: int) -> bool:
        import copy

        from ppn_bayes.decode.generation import Decoder
        from ppn_bayes.decode.speculative import speculative_generate

        if size not in self.drafts:
            self.drafts = {size: Decoder(copy.deepcopy(draft_lm).to(device=self.device, dtype=torch.float32),
                                         max_len=self.max_len)}
        draft = self.drafts[size]
        return all(torch.equal(speculative_generate(self.target, draft, p, self.new_tokens, k=k).tokens, expected)
                   for p, expected in zip(self.prompts, self.plain))


# -- the run --------------------------------------------------------------------------------------
def run_speculative(config: SpeculativeConfig) -> list[dict]:
    """Time plain greedy decoding of the target, then every (size, k); one record each."""
    from ppn_bayes.decode.generation import _raise_recompile_limit
    from ppn_bayes.io import atomic_write_text
    from ppn_bayes.decode.speculative import choose_draft, new_parameter_bytes

    if config.threads:
        torch.set_num_threads(config.threads)
    began = time.perf_counter()
    _raise_recompile_limit(256)
    source = open_target(config)
    dtype = getattr(torch, config.dtype)
    if config.target is not None:
        from ppn_bayes.lm import load_lm

        target_lm = load_lm(config.target, dtype=dtype, device=config.device)[0]
        target_name = config.target
    else:
        target_lm = source.lm
        target_name = f"{config.model} (the full network the drafts are cut from)"
    prompts = read_prompts(config, source.tokenizer, target_lm.config.vocab_size)
    records: list[dict] = []
    made: dict[float, tuple] = {}  # size -> (draft, size reached, bytes it adds)
    checks: dict[str, Fp32Check] = {}
    if config.shared:  # views of the target's tensors: move the target first, once
        source.lm.to(config.device, dtype)

    def make_draft(size: float):
        """The draft of ``size`` on the device in the benchmark's dtype; none after the time budget."""
        if config.time_budget is not None and time.perf_counter() - began > config.time_budget:
            raise TimeoutError(f"out of time before size {size}")
        draft = source.draft(size, shared=config.shared).to(config.device, dtype)
        added = new_parameter_bytes(draft, source.lm) if config.shared else \
            sum(p.numel() * p.element_size() for p in draft.parameters())
        made[size] = (draft, float(draft.config.ppn_size_reached), added)
        return draft

    def on_trial(trial):
        draft, reached, added = made[trial.size_requested]
        baseline = trial.tokens_per_s / trial.speedup
        if config.dtype == "float32":
            identical_fp32 = trial.identical
        elif config.fp32_check_tokens:
            if "fp32" not in checks:
                checks["fp32"] = Fp32Check(target_lm, prompts[:1], config.fp32_check_tokens, max(config.ks),
                                           config.device)
            identical_fp32 = checks["fp32"](trial.size_requested, draft, trial.k)
        else:
            identical_fp32 = None
        record = append_record(
            "speculative", method=config.method, model=config.name,
            records_dir=config.records_dir,
            size_requested=trial.size_requested, size_reached=reached, k=trial.k,
            acceptance_rate=trial.acceptance_rate, mean_accepted=trial.mean_accepted,
            tokens_per_step=trial.tokens_per_step, tokens_per_s=trial.tokens_per_s,
            baseline_tokens_per_s=baseline, ratio_vs_target=trial.speedup,
            draft_tokens_per_s=trial.draft_tokens_per_s, draft_speed_vs_target=trial.draft_tokens_per_s / baseline,
            identical_output=trial.identical, identical_output_fp32=identical_fp32,
            histogram=list(trial.histogram), steps=trial.steps, new_tokens=config.new_tokens,
            prompts=len(prompts), prompt_len=config.prompt_len, repeats=config.repeats, dtype=config.dtype,
            compiled=config.compile, quick=config.quick,
            settings={"target": target_name, "draft_storage": "shared views" if config.shared else "copy",
                      "draft_added_bytes": added, "draft_params": trial.draft_params,
                      "verify_len": max(config.ks) + 1 if config.compile else None,
                      "compile_backend": config.compile_backend if config.compile else None,
                      "threads": torch.get_num_threads(), "greedy": True,
                      "decoder": "ppn_bayes.generation.Decoder (static KV cache)"},
        )
        records.append(record)
        print(f"[speculative] size {trial.size_requested:.2f} k {trial.k}: accept {trial.acceptance_rate:.3f}, "
              f"{trial.tokens_per_step:.2f} tokens/pass, {trial.tokens_per_s:.1f} tokens/s "
              f"(target {baseline:.1f}), x{trial.speedup:.3f}, identical {trial.identical}"
              + ("" if config.dtype == "float32" else f", fp32 {identical_fp32}"), flush=True)

    try:
        choice = choose_draft(
            target_lm, make_draft, sizes=config.sizes, ks=config.ks, prompts=prompts,
            max_new_tokens=config.new_tokens, compile=config.compile, device=config.device, dtype=dtype,
            repeats=config.repeats, on_trial=on_trial, compile_backend=config.compile_backend,
        )
    except TimeoutError as err:
        print(f"[speculative] {err}; {len(records)} records written", flush=True)
        return records
    print(choice.table(), flush=True)
    if config.out is not None:
        atomic_write_text(config.out, json.dumps(choice.to_dict(), indent=2))
    return records


# -- command line --------------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.replace(",", " ").split())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(",", " ").split())


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (every one documented)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True,
                   help="where the drafts come from: a ranked or fit checkpoint, or a model directory / .gguf "
                        "file with --rankings or --masks")
    p.add_argument("--target", default=None,
                   help="the target LM (default: the full network of --model, the drafts' own weights)")
    p.add_argument("--rankings", default=None, help="rankings file written by benchmarks/quality.py")
    p.add_argument("--method", default=RECORD,
                   help="the method in the records, and which ranking of --rankings cuts the drafts; 'magnitude' "
                        f"without --rankings or --masks ranks units by weight magnitude here (default: {RECORD})")
    p.add_argument("--masks", default=None, help="a mask file (`ppn-bayes masks`) instead of --rankings")
    p.add_argument("--sizes", type=_floats, default=None,
                   help=f"draft sizes (default: {listed(SPECULATIVE_SIZES)}; with --quick "
                        f"{listed(SPECULATIVE_QUICK_SIZES)})")
    p.add_argument("--ks", type=_ints, default=None, help="draft lengths k (default: 2,3,4,5,6,7,8; with --quick 2,4)")
    p.add_argument("--data", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"),
                   help="text the prompts are cut from (default: WikiText-2 test; random ids if absent)")
    p.add_argument("--n-prompts", type=int, default=4, help="prompts (default: 4)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (default: 32)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per prompt (default: 256)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of every prompt (default: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode and verify steps, CUDA graphs on a GPU (default: on CUDA only)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend: inductor (mode reduce-overhead) or cudagraphs (no kernel "
                        "compilation: faster to start) (default: inductor)")
    p.add_argument("--shared", action="store_true",
                   help="drafts as views of the rank-sorted target's weights (records the bytes they add)")
    p.add_argument("--fp32-check-tokens", type=int, default=64,
                   help="when not float32: tokens of the float32 identity check of each pair (eager, first "
                        "prompt), 0 for none (default: 64)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 2 on CPU)")
    p.add_argument("--records-dir", default=str(RECORDS_DIR),
                   help=f"where speculative.jsonl goes (default: {RECORDS_DIR})")
    p.add_argument("--out", default=None, help="also write the table's data and the recommendation here (JSON)")
    p.add_argument("--model-name", default=None, help="model name in the records (default: from --model)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds after which no new size is started")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: 2 prompts x 32 new tokens, sizes {listed(SPECULATIVE_QUICK_SIZES)} and k 2,4 "
                        "unless given "
                        "(the records say quick)")
    return p


def config_from(args: argparse.Namespace) -> SpeculativeConfig:
    """A :class:`SpeculativeConfig` from parsed flags."""
    cuda = torch.device(args.device).type == "cuda"
    quick = args.quick
    return SpeculativeConfig(
        model=args.model, target=args.target, rankings=args.rankings, method=args.method, masks=args.masks,
        sizes=args.sizes or (SPECULATIVE_QUICK_SIZES if quick else SPECULATIVE_SIZES),
        ks=args.ks or ((2, 4) if quick else KS),
        data=args.data,
        n_prompts=2 if quick else args.n_prompts, prompt_len=args.prompt_len,
        new_tokens=32 if quick else args.new_tokens, repeats=args.repeats, device=args.device,
        dtype=args.dtype or ("bfloat16" if cuda else "float32"),
        compile=args.compile if args.compile is not None else cuda, compile_backend=args.compile_backend,
        shared=args.shared, fp32_check_tokens=16 if quick else args.fp32_check_tokens,
        threads=args.threads or (None if cuda else 2), records_dir=args.records_dir, out=args.out,
        model_name=args.model_name, time_budget=args.time_budget, quick=quick,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse flags, build the configuration, run."""
    config = config_from(build_parser().parse_args(argv))
    records = run_speculative(config)
    print(f"[speculative] {len(records)} records appended to {Path(config.records_dir) / 'speculative.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
