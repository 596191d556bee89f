"""Settling, on the demo's tiny LM (CPU): do the last steps on the deployed masks steady the small sizes?

The fit of record's sub-networks at 0.3 differed between two seeds (61.6 and 92.5 on
WikiText-2) while its masks at 0.3 still changed in the fit's last steps (docs/method.md).
``FitConfig.settle_steps`` freezes the guide for the last steps and trains the LM on the
deployed masks alone. This compares fits with and without it where a fit takes a minute:
the demo's tiny Llama (4 layers, characters of the embedded text), pretrained as the demo
does, then fitted with the fit of record's objective and sizes (``quality.DEFAULT_FIT``:
frozen teacher, full-logit KL, prefix gates, activation start, cosine rates, small sizes
drawn more often, ``lr_lm`` 1e-3, β2 0.95) once per seed and ``settle_steps`` value, on the
same steps, text and seeds. Each fit's deployed masks at ``--sizes`` are evaluated on the
demo's held-out tenth; the fit's own evaluations every tenth of its steps show how far the
masks moved. One record per ``settle_steps`` value and size in
``<records-dir>/settle.jsonl``: the perplexity over the seeds (geometric mean, lowest,
highest), the same as nats a token above the dense LM (``excess``), and the share of that
size's gates that changed between the fit's last two evaluations. A tiny character LM is not SmolLM2: this says whether the mechanism does
what it should, not what it gives at 100M tokens.

    python benchmarks/settle.py                                  # seeds 0-2, 300 steps, settle 0 and 30
    python benchmarks/settle.py --seeds 0,1 --steps 60 --settle 0,6 --records-dir /tmp/r   # a quick look
    python benchmarks/settle.py --settle 30+30                   # settling from the guide averaged
                                                                 # over the 30 steps before it
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import SETTLE_SIZES  # noqa: E402
from quality import DEFAULT_FIT  # noqa: E402

from ppn_bayes.data import CharTokenizer, TokenBlocks, embedded_text, tokenize  # noqa: E402
from ppn_bayes.demo import demo_lm, pretrain  # noqa: E402
from ppn_bayes.inspect.evaluate import perplexity  # noqa: E402
from ppn_bayes.records import RECORDS_DIR, append_record  # noqa: E402
from ppn_bayes.train import fit  # noqa: E402

MODEL = "tiny-llama (demo: 4 layers, 128 wide, characters)"


def _numbers(kind):
    def parse(text: str):
        try:
            values = tuple(kind(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values or any(v < 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected numbers of at least 0, got {text!r}")
        return values
    return parse


def variants(text: str) -> tuple[tuple[int, int], ...]:
    """``--settle``: comma-separated ``S`` (settle_steps S) or ``S+A`` (and average_steps A)."""
    out = []
    for part in text.split(","):
        settle, _, average = part.partition("+")
        try:
            pair = (int(settle), int(average) if average else 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected S or S+A (whole steps), got {part!r}") from None
        if min(pair) < 0:
            raise argparse.ArgumentTypeError(f"expected steps of at least 0, got {part!r}")
        out.append(pair)
    return tuple(out)


def variant_name(settle: int, average: int) -> str:
    return f"ppn_bayes, settle_steps={settle}" + (f", average_steps={average}" if average else "")


def settle_config(steps: int, settle_steps: int, seed: int, sizes: tuple[float, ...], average_steps: int = 0):
    """The fit of record's recipe at the demo's scale: 16 x 128 a step, 16 channels an MLP unit
    (32 units a layer, as SmolLM2's 24), an evaluation every tenth of the steps."""
    return DEFAULT_FIT.replace(steps=steps, batch_size=16, seq_len=128, mlp_group=16, checkpoint_every=0,
                               log_every=10, warmup_steps=max(1, steps // 30), size_min=min(sizes),
                               seed=seed, settle_steps=settle_steps, average_steps=average_steps,
                               eval_sizes=tuple(sizes), eval_every=max(1, steps // 10), eval_windows=8)


def moved(validation: list[dict], size: float) -> float | None:
    """The share of gates whose deployed mask at ``size`` changed between the last two evaluations."""
    if len(validation) < 2:
        return None
    before, after = ({row["size"]: row["kept"] for row in v["sizes"]}[size] for v in validation[-2:])
    return sum(a != b for a, b in zip(before, after)) / len(after)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=_numbers(int), default=(0, 1, 2), help="fit seeds (default: 0,1,2)")
    p.add_argument("--steps", type=int, default=300, help="fit steps (default: 300)")
    p.add_argument("--settle", type=variants, default=((0, 0), (30, 0)),
                   help="settle_steps values compared, S or S+A with average_steps A (default: 0,30)")
    p.add_argument("--sizes", type=_numbers(float), default=SETTLE_SIZES,
                   help=f"sizes (default: {','.join(map(str, SETTLE_SIZES))})")
    p.add_argument("--pretrain-steps", type=int, default=400, help="the tiny LM's pretraining (default: 400)")
    p.add_argument("--eval-windows", type=int, default=40, help="held-out windows of 128 (default: 40)")
    p.add_argument("--records-dir", default=str(RECORDS_DIR), help="where settle.jsonl is appended to")
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_windows < 1:
        raise SystemExit("--steps and --eval-windows must be at least 1")
    for size in args.sizes:
        if not 0 < size <= 1:
            raise SystemExit(f"--sizes must lie in (0, 1], got {size}")
    for settle, average in args.settle:
        if average and not settle:
            raise SystemExit(f"--settle 0+{average}: averaging needs settling (S+A with S > 0)")
        if settle + average > args.steps:
            raise SystemExit(f"--settle {settle}+{average} is more than --steps {args.steps}")
    configs = {(v, seed): settle_config(args.steps, v[0], seed, args.sizes, v[1]) for v in args.settle
               for seed in args.seeds}

    text = embedded_text()
    tokenizer = CharTokenizer.for_text(text)
    train, held_out = TokenBlocks(tokenize(text, tokenizer), 128, 0).split(0.1)
    base = demo_lm(tokenizer.vocab_size)
    pretrain(base, train, steps=args.pretrain_steps, batch_size=16, progress=False)
    dense = perplexity(base, held_out.tokens, seq_len=128, limit=args.eval_windows).ppl
    print(f"[settle] dense tiny LM: held-out perplexity {dense:.4f}", flush=True)

    results = {}
    for (variant, seed), config in configs.items():
        lm = copy.deepcopy(base)  # every fit starts from the same pretrained LM
        began = time.perf_counter()
        fitted = fit(lm, train, config, progress=False, eval_tokens=held_out.tokens)
        ranking = fitted.ranking()
        row = {}
        for size in args.sizes:
            masks = ranking.masks(size)
            ppl = perplexity(fitted.lm_at(size), held_out.tokens, seq_len=128, masks=masks, limit=args.eval_windows).ppl
            row[size] = {"ppl": ppl, "size_reached": masks.size_reached,
                         "moved": moved(fitted.result.validation, size)}
        results[variant, seed] = row
        print(f"[settle] {variant_name(*variant)}, seed {seed}: "
              + ", ".join(f"{s}: {r['ppl']:.4f}" for s, r in row.items())
              + f" ({time.perf_counter() - began:.0f} s)", flush=True)

    command = "python benchmarks/settle.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for variant in args.settle:
        settle, average = variant
        for size in args.sizes:
            runs = [results[variant, seed][size] for seed in args.seeds]
            ppls = [r["ppl"] for r in runs]
            shares = [r["moved"] for r in runs if r["moved"] is not None]
            append_record("settle", method=variant_name(settle, average), model=MODEL,
                          records_dir=args.records_dir, command=command, size_requested=size,
                          size_reached=runs[0]["size_reached"], dense_ppl=dense,
                          ppl=math.exp(sum(map(math.log, ppls)) / len(ppls)), ppl_lowest=min(ppls),
                          ppl_highest=max(ppls), seeds=len(ppls),
                          # nats a token above the dense LM: the seeds' mean, lowest and highest
                          excess=sum(math.log(x / dense) for x in ppls) / len(ppls),
                          excess_lowest=math.log(min(ppls) / dense), excess_highest=math.log(max(ppls) / dense),
                          gates_moved_at_the_end=sum(shares) / len(shares) if shares else None,
                          train_tokens=args.steps * 16 * 128, settle_steps=settle, average_steps=average,
                          ppl_each_seed=ppls, settings={"fit": configs[variant, args.seeds[0]].to_dict(),
                                                        "pretrain_steps": args.pretrain_steps,
                                                        "eval_windows": args.eval_windows,
                                                        "seeds": list(args.seeds)})
    print(f"[settle] {len(args.settle) * len(args.sizes)} records appended to {args.records_dir}/settle.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
