"""``ppn-bayes speculate``: measure sub-networks as speculative-decoding drafts, recommend one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import positive_int, size_fraction

_DTYPES = ["float32", "bfloat16", "float16"]


def register(subparsers) -> None:
    """Add ``speculate`` to the ``ppn-bayes`` parser."""
    parser = subparsers.add_parser(
        "speculate", help="measure sub-networks as speculative-decoding drafts and recommend a size and k",
        description="Greedy speculative decoding of the full network with its own sub-networks as drafts: for "
                    "every --sizes x --ks pair, the acceptance rate, tokens per target pass and tokens/s against "
                    "plain greedy decoding of the target measured in the same run, and whether the output equals "
                    "plain greedy decoding token for token; then the fastest pair for this target and machine, or a "
                    "warning (stderr, and 'warning' in --out) when no pair beats plain greedy decoding. "
                    "CHECKPOINT is a ranked checkpoint (`ppn-bayes export-ranked`), a fit checkpoint "
                    "(`ppn-bayes fit`), or a Hugging Face directory / .gguf file with --masks.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a ranked or fit checkpoint, or a model directory / .gguf file (with --masks)")
    parser.add_argument("--masks", default=None,
                        help="a mask file (`ppn-bayes masks`) whose ranking cuts the drafts (needed for a plain model)")
    parser.add_argument("--sizes", type=size_fraction, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7],
                        help="draft sizes, fractions of the decoder's parameters (default: 0.3 0.4 0.5 0.6 0.7)")
    parser.add_argument("--ks", type=positive_int, nargs="+", default=[2, 3, 4, 6, 8],
                        help="draft lengths k, tokens drafted per target pass (default: 2 3 4 6 8)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt-file", default=None,
                         help="a text file with one prompt per line (blank lines skipped)")
    prompts.add_argument("--data", default=None,
                         help="a text file (or .safetensors with 1-D 'tokens') to cut --n-prompts prompts from")
    parser.add_argument("--n-prompts", type=positive_int, default=4, help="prompts cut from --data (default: 4)")
    parser.add_argument("--prompt-len", type=positive_int, default=32, help="tokens per prompt cut from --data (default: 32)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens generated per prompt (default: 64)")
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed runs of every prompt (default: 1)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=_DTYPES, help="weights' dtype (default: float32)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode steps (torch.compile; CUDA graphs on a GPU)")
    parser.add_argument("--shared", action="store_true",
                        help="cut drafts as views of the rank-sorted target's weights (no copy) instead of copies")
    parser.add_argument("--recommend", action="store_true",
                        help="print only the best size and k (JSON; beats_plain false: no draft beats plain greedy "
                             "decoding), not the table")
    parser.add_argument("--out", default=None, help="also write every measurement and the recommendation here (JSON)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_speculate)


def _read_prompts(args: argparse.Namespace, tokenizer) -> list:
    import torch

    from ..data import load_tokens
    from ..decode.speculative import prompts_from_tokens

    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"no prompt file at {path}")
        if tokenizer is None:
            raise ValueError(f"{args.checkpoint} has no tokenizer to read --prompt-file with; give --data as "
                             ".safetensors tokens")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{path} holds no prompt")
        return [torch.tensor(tokenizer.encode(line, add_special_tokens=False), dtype=torch.long) for line in lines]
    tokens = load_tokens(args.data, tokenizer)
    return prompts_from_tokens(tokens, n_prompts=args.n_prompts, prompt_len=args.prompt_len)


def _speculate(args: argparse.Namespace) -> int:
    import torch

    from ..io import atomic_write_text
    from ..decode.speculative import choose_draft, load_target

    if args.out is not None and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    if args.max_new_tokens < 1 or args.repeats < 1:
        raise ValueError("--max-new-tokens and --repeats must be at least 1")
    target = load_target(args.checkpoint, masks_file=args.masks, device=args.device,
                         dtype=getattr(torch, args.dtype), rank=args.shared)
    prompts = _read_prompts(args, target.tokenizer)
    choice = choose_draft(target.lm, target, sizes=args.sizes, ks=args.ks, prompts=prompts,
                          max_new_tokens=args.max_new_tokens, compile=args.compile, repeats=args.repeats,
                          shared=args.shared, progress=not args.quiet)
    result = choice.to_dict()
    result.update(checkpoint=str(args.checkpoint), dtype=args.dtype, shared=args.shared)
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2))
    if args.recommend:
        print(json.dumps(result["best"]))
    else:
        print(choice.table())
    if choice.warning is not None:
        print(f"ppn-bayes speculate: warning: {choice.warning}", file=sys.stderr)
    return 0
