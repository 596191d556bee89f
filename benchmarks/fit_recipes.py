"""Fit recipes: short ppn_bayes fits under different settings, compared at small sizes.

The recipe search that chooses the settings of the fit of record (benchmarks/quality.py):
each recipe is a named set of :class:`~ppn_bayes.config.FitConfig` changes, fitted for the
same steps on the same text, its sub-networks evaluated at ``--sizes`` on the first
``--limit-windows`` windows of the evaluation text (float32), one record per recipe and
size in ``<records-dir>/recipes.jsonl``. ``--choose`` reads those records and writes the
recipe with the lowest mean log-perplexity over the sizes as ``--fit-set`` flags.

One recipe per process, so several run side by side on one GPU::

    python benchmarks/fit_recipes.py --model M.gguf --recipe shared --steps 150 --device cuda ...
    python benchmarks/fit_recipes.py --choose --records-dir OUT/records --out best.txt

Quick CPU check: ``--quick`` (2 steps of 1 x 128 tokens, 2 windows; the records say quick).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import RECIPE_SIZES, listed  # noqa: E402
from quality import SHARED, QualityConfig, Run, _autocast, load_inputs  # noqa: E402

from ppn_bayes.core.config import FitConfig  # noqa: E402
from ppn_bayes.records import RECORDS_DIR, append_record  # noqa: E402

#: name -> FitConfig changes (``freeze_lm_steps`` given as a fraction of the steps).
RECIPES = {
    # "default": the FitConfig defaults of the first search (2026-11-28), lr_lm 1e-4; the
    # search moved the default to 3e-5, so the recipe now names its rate.
    "default": dict(lr_lm=1e-4),
    "lr1e-5": dict(lr_lm=1e-5),
    "warm": dict(freeze_lm_steps=0.5, lr_lm=3e-5),
    "shared": dict(gate_coupling="shared", init_jitter=0.5, lr_lm=3e-5),
    "shared-warm": dict(gate_coupling="shared", init_jitter=0.5, freeze_lm_steps=0.5, lr_lm=3e-5),
    "shared-1e-4": dict(gate_coupling="shared", init_jitter=0.5),
    "frozen": dict(train_lm=False),
}


def recipe_config(name: str, base: FitConfig) -> FitConfig:
    """``base`` with the changes of recipe ``name``."""
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    changes = dict(RECIPES[name])
    if "freeze_lm_steps" in changes:
        changes["freeze_lm_steps"] = int(changes["freeze_lm_steps"] * base.steps)
    return base.replace(**changes)


def run_recipe(args: argparse.Namespace) -> None:
    from ppn_bayes.fit import fit

    base = FitConfig(steps=2 if args.quick else args.steps, batch_size=1 if args.quick else args.batch,
                     seq_len=128 if args.quick else args.seq_len, size_min=0.3, log_every=10,
                     mlp_group=args.mlp_group)
    config = recipe_config(args.recipe, base)
    quality = QualityConfig(model=args.model, eval_text=args.eval_text, train_text=args.train_text,
                            device=args.device, work_dir=args.work_dir, fit=config, seq_len=args.eval_seq_len,
                            limit_windows=2 if args.quick else args.limit_windows, quick=args.quick)
    lm, tokenizer, eval_tokens, train_tokens = load_inputs(quality)
    run = Run(quality, lm, tokenizer, eval_tokens, train_tokens)
    began = time.perf_counter()
    with _autocast(quality):
        fitted = fit(lm, train_tokens, config, progress=False)
    seconds = time.perf_counter() - began
    fitted.lm.float().eval()
    ranking = fitted.ranking()
    full = run.evaluate(fitted.lm_at(1.0))  # with size adapters (size_rank > 0) every size has its own weights
    for size in args.sizes:
        masks = ranking.masks(size)
        result = run.evaluate(fitted.subnetwork_of(masks))
        append_record("recipes", method="ppn_bayes", recipe=args.recipe, changes=RECIPES[args.recipe],
                      model=run.config.name, records_dir=args.records_dir, size_requested=size,
                      size_reached=masks.size_reached, ppl=result.ppl, nll=result.nll, windows=result.windows,
                      seq_len=result.seq_len, full_ppl=full.ppl, train_tokens=config.steps * config.batch_size
                      * config.seq_len, fit_seconds=seconds, final_loss=fitted.result.history[-1],
                      fit=config.to_dict(), quick=args.quick, device=args.device, eval_dtype="float32")
        print(f"[recipes] {args.recipe:12s} size {size:.2f}: ppl {result.ppl:10.2f} (full LM {full.ppl:.2f}, "
              f"fit {seconds:.0f} s)", flush=True)


def choose(args: argparse.Namespace) -> None:
    """The recipe with the lowest mean log-perplexity over the sizes it was measured at."""
    path = Path(args.records_dir) / "recipes.jsonl"
    scores: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("recipe") in RECIPES and record["recipe"] != "frozen":
            scores.setdefault(record["recipe"], []).append(math.log(record["ppl"]))
    if not scores:
        raise SystemExit(f"no recipe records in {path}")
    counts = max(len(v) for v in scores.values())
    complete = {k: sum(v) / len(v) for k, v in scores.items() if len(v) == counts}
    best = min(complete, key=complete.get)
    flags = [f"--fit-set {k}={v}" for k, v in RECIPES[best].items() if k != "freeze_lm_steps"]
    if "freeze_lm_steps" in RECIPES[best]:
        flags.append(f"--freeze-fraction {RECIPES[best]['freeze_lm_steps']}")
    text = " ".join(flags)
    Path(args.out).write_text(text + "\n")
    for name, score in sorted(complete.items(), key=lambda kv: kv[1]):
        print(f"[recipes] {name:12s} mean log-ppl {score:.3f}{'  <- best' if name == best else ''}")
    print(f"[recipes] flags: {text}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--recipe", default="default", help=f"one of {', '.join(RECIPES)} (default: default)")
    p.add_argument("--choose", action="store_true", help="pick the best recipe from the records and write --out")
    p.add_argument("--out", default="best-recipe.txt", help="with --choose: where the flags go")
    p.add_argument("--model", help="the LM: a .gguf file or a Hugging Face directory")
    p.add_argument("--eval-text", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"), help="evaluation text")
    p.add_argument("--train-text", default=str(SHARED / "data/wiki-summaries/wiki_summaries_en.txt"),
                   help="training text")
    p.add_argument("--steps", type=int, default=150, help="fit steps (default: 150)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    p.add_argument("--sizes", type=lambda s: tuple(float(x) for x in s.split(",")), default=RECIPE_SIZES,
                   help=f"sizes evaluated (default: {listed(RECIPE_SIZES)})")
    p.add_argument("--mlp-group", type=int, default=64, help="intermediate channels per MLP unit (default: 64)")
    p.add_argument("--eval-seq-len", type=int, default=2048, help="evaluation window (default: 2048)")
    p.add_argument("--limit-windows", type=int, default=40, help="evaluation windows (default: 40)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--work-dir", default="runs/quality", help="the model and token caches (as quality.py)")
    p.add_argument("--records-dir", default=str(RECORDS_DIR), help="where recipes.jsonl is appended to")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 2 steps of 1 x 128 tokens, 2 windows")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.choose:
        choose(args)
    else:
        if not args.model:
            raise SystemExit("--model is needed to fit a recipe")
        run_recipe(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
