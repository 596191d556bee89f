"""How much of a fit step's clipped gradient is the guide's: per-step gradient norms.

    python benchmarks/grad_norms.py --model MODEL.gguf --text corpus.txt [--steps 8 --batch 4 --seq-len 256]

Runs ``ppn_bayes.fit`` with the fit of record's recipe (``FitConfig.recipe("record")``,
without its settling steps, so that the guide learns at every step, plus any ``--fit-set
KEY=VALUE``) for a few steps and prints, for each step, the norm of the
guide's gradient, the norm of the LM's and the norm the fit clips (both together, at
``grad_clip``), before clipping. The fit clips the two groups as one vector, where width-kd's
distillation clips the LM alone: this says how far the guide's share moves the LM's step. A
diagnostic for the developers (prints only, no record), on the CPU in float32 unless
``--device`` says otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import fit_overrides  # noqa: E402  (the --fit-set KEY=VALUE parser of quality.py)


def gradient_norms(lm, tokens: torch.Tensor, config) -> list[dict]:
    """Fit ``lm`` on ``tokens`` with ``config`` and return, for each step, ``{"guide", "lm",
    "clipped"}``: the norms of the guide's and the LM's gradients and the norm the fit's clip
    measured over both, before clipping (the guide's is 0 on the steps its parameters get no
    gradient: held or settled). The LM is ``lm`` itself (the fit trains it in place), so a
    parameter that is not one of its own is the guide's."""
    from ppn_bayes.fit import fit

    own = {id(p) for p in lm.parameters()}
    rows: list[dict] = []
    clip = torch.nn.utils.clip_grad_norm_

    def measured(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        squares = {"guide": 0.0, "lm": 0.0}
        for p in parameters:
            if p.grad is not None:
                squares["lm" if id(p) in own else "guide"] += float(p.grad.double().pow(2).sum())
        total = clip(parameters, max_norm, *args, **kwargs)
        rows.append({"guide": math.sqrt(squares["guide"]), "lm": math.sqrt(squares["lm"]), "clipped": float(total)})
        return total

    with mock.patch.object(torch.nn.utils, "clip_grad_norm_", measured):
        fit(lm, tokens, config, progress=False)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a .gguf file or a Hugging Face LM directory")
    p.add_argument("--text", required=True, help="training text")
    p.add_argument("--chars", type=int, default=400_000, help="characters of --text to tokenise (default: 400000)")
    p.add_argument("--steps", type=int, default=8, help="fit steps (default: 8)")
    p.add_argument("--batch", type=int, default=4, help="windows a step (default: 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens a window (default: 256)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fit-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a FitConfig field over the recipe (repeatable), e.g. hold_steps=4")
    args = p.parse_args(argv)

    from ppn_bayes import FitConfig
    from ppn_bayes.lm import load_lm

    config = fit_overrides(args.fit_set, FitConfig.recipe(  # the guide learns every step: no settling
        "record", steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, warmup_steps=1, log_every=1,
        settle_steps=0, average_steps=0))
    lm, tokenizer = load_lm(args.model, device=args.device)
    tokens = torch.tensor(tokenizer(Path(args.text).read_text()[:args.chars])["input_ids"])
    for step, row in enumerate(gradient_norms(lm, tokens, config)):
        share = row["guide"] ** 2 / row["clipped"] ** 2 if row["clipped"] else 0.0
        scale = min(1.0, config.grad_clip / row["clipped"]) if row["clipped"] else 1.0
        alone = min(1.0, config.grad_clip / row["lm"]) if row["lm"] else 1.0
        print(f"step {step}: guide {row['guide']:.4g}, LM {row['lm']:.4g}, clipped together {row['clipped']:.4g} "
              f"(the guide's share of the squared norm {share:.1%}; the LM's step scaled by {scale:.4g}, "
              f"by {alone:.4g} if clipped alone)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
