"""``ppn-bayes demo`` and ``ppn-bayes fit``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.config import FitConfig
from ..store import DEFAULT_SHARD_TOKENS
from .options import add_fit_options, fit_config_from, positive_float


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="pretrain a tiny LM on the embedded text, fit it, compare with random cuts",
        description="The main job on an embedded default (no download, no GPU): a tiny Llama is "
                    "pretrained on the text shipped with ppn_bayes, its gate posterior is fitted, and "
                    "the perplexity of its sub-networks is compared with random cuts of the same sizes.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--model", default=None,
                      help="a local Hugging Face directory or .gguf file instead of the tiny default")
    demo.add_argument("--text", default=None, help="a local text file instead of the embedded text")
    demo.add_argument("--sizes", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.4, 0.3],
                      help="sizes to report (fractions of decoder parameters)")
    demo.add_argument("--pretrain-steps", type=int, default=400, help="pretraining steps of the tiny LM")
    demo.add_argument("--fit-steps", type=int, default=150, help="fit steps")
    demo.add_argument("--eval-windows", type=int, default=40, help="held-out windows for perplexity")
    demo.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --out")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    fit = subparsers.add_parser(
        "fit", help="fit the gate posterior of a local LM on a local text",
        description="Fit the gate posterior and the LM's weights together (Trace_ELBO, AdamW). "
                    "Writes OUT/checkpoint (resumable) and OUT/result.json.",
    )
    fit.add_argument("--model", required=True, help="a local Hugging Face directory or .gguf file")
    fit.add_argument("--data", required=True, nargs="+", metavar="PATH[:WEIGHT]",
                     help="training text: one or more sources, each a text file (tokenised with the model's "
                          "tokenizer), a .safetensors file with a 1-D 'tokens' tensor or a token store folder "
                          "(ppn-bayes teacher-text), with an optional mixing weight after the last ':' (e.g. "
                          "wiki.txt:0.5 gen/:0.5; a weight for every source or for none: equal weights); each "
                          "row of a batch draws its source by the weights")
    fit.add_argument("--out", required=True, help="output folder")
    fit.add_argument("--eval-data", default=None,
                     help="held-out text (as --data): its NLL for the full LM and the deployed masks at each "
                          "--eval-sizes (default: --size-min), with the ranking's stability and the share of "
                          "ambiguous units, every --eval-every steps and at the end (result.json's 'validation'; "
                          "each row also appended to OUT/validation.jsonl as it is made); not with --parallel fsdp")
    fit.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    fit.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu); under torchrun each process "
                          "uses cuda:LOCAL_RANK when CUDA is present")
    fit.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="LM weights' dtype")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.add_argument("--stop-after", type=positive_float, default=None, metavar="SECONDS",
                     help="stop at the first step after this long, with a checkpoint that --resume continues "
                          "(for machines lent in stretches)")
    add_fit_options(fit)
    fit.set_defaults(func=_fit)

    teacher = subparsers.add_parser(
        "teacher-text", help="training text the LM writes itself, continuing prompts from a corpus",
        description="Continue prompts drawn from a corpus with the LM's own tempered top-k (top-p) samples and "
                    "write the sequences (prompt, then continuation) for `ppn-bayes fit --data`: more, and more "
                    "varied, training text than a small corpus. A folder --out is a token store (sharded, "
                    "memory-mapped, resumable with --resume; docs/formats.md); a .safetensors --out one token "
                    "file, as before the store existed (one generator for all rounds; no --resume).",
    )
    teacher.add_argument("--model", required=True, help="a local Hugging Face directory or .gguf file")
    teacher.add_argument("--data", required=True, help="the corpus the prompts come from (as fit --data)")
    teacher.add_argument("--out", required=True,
                         help="a token store folder to write, or a token file (.safetensors)")
    teacher.add_argument("--tokens", type=int, required=True, help="at least this many tokens (whole sequences)")
    teacher.add_argument("--prompt-len", type=int, default=32, help="corpus tokens per prompt (default: 32)")
    teacher.add_argument("--new-tokens", type=int, default=224, help="tokens generated per prompt (default: 224)")
    teacher.add_argument("--batch-size", type=int, default=32, help="sequences generated together (default: 32)")
    teacher.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    teacher.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0: all "
                                                              "(default: 50)")
    teacher.add_argument("--top-p", type=float, default=None,
                         help="sample from the smallest set of the top-k tokens holding this probability "
                              "(nucleus sampling; default: off)")
    teacher.add_argument("--min-distinct", type=float, default=None,
                         help="drop a sequence whose continuation has fewer distinct 4-grams than this fraction "
                              "of its 4-grams (degenerate loops; default: 0.5 for a store, off for a .safetensors "
                              "file)")
    teacher.add_argument("--shard-tokens", type=int, default=None,
                         help=f"tokens per shard of a store, whole sequences (default: {DEFAULT_SHARD_TOKENS})")
    teacher.add_argument("--seed", type=int, default=0, help="seed of the prompts and the samples (default: 0)")
    teacher.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    teacher.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="LM weights' dtype")
    teacher.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on a GPU)")
    teacher.add_argument("--resume", action="store_true",
                         help="continue an interrupted store at --out after its last whole shard (same settings)")
    teacher.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    teacher.add_argument("--quiet", action="store_true", help="no progress bar")
    teacher.set_defaults(func=_teacher_text)


def _demo(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo

    base = DemoConfig()
    config = DemoConfig(
        out=args.out, model=args.model, text=args.text, sizes=tuple(args.sizes),
        pretrain_steps=args.pretrain_steps, fit=base.fit.replace(steps=args.fit_steps),
        eval_windows=args.eval_windows, overwrite=args.overwrite,
    )
    result = run_demo(config, progress=not args.quiet)
    print(result.table())
    print(f"wrote {Path(args.out) / 'table.txt'}, result.json, perplexity.png and checkpoint/")
    return 0


def _fit(args: argparse.Namespace) -> int:
    import torch

    from .. import distributed
    from ..data import load_tokens
    from ..train import fit
    from ..io import atomic_write_text
    from ..lm import load_lm, vocab_rows
    from ..store import open_mixture

    config: FitConfig = fit_config_from(args)
    out = Path(args.out)
    if out.exists() and not args.resume and (out / "checkpoint").exists():
        raise FileExistsError(f"{out / 'checkpoint'} exists; pass --resume to continue it")
    # Under torchrun the LM is read on the CPU: fit moves it (DDP) or its shards (FSDP) to cuda:LOCAL_RANK.
    device = "cpu" if distributed.launched() else args.device
    lm, tokenizer = load_lm(args.model, dtype=getattr(torch, args.dtype), device=device)
    blocks = open_mixture(args.data, tokenizer, seq_len=config.seq_len, seed=config.seed, vocab_size=vocab_rows(lm))
    eval_tokens = load_tokens(args.eval_data, tokenizer) if args.eval_data else None
    on_evaluation = None
    if distributed.is_main_process() and eval_tokens is not None:
        out.mkdir(parents=True, exist_ok=True)

        def on_evaluation(row: dict) -> None:  # a log, line by line, for a fit still running
            with open(out / "validation.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps(row) + "\n")

    fitted = fit(lm, blocks, config, checkpoint=out / "checkpoint", resume=args.resume, tokenizer=tokenizer,
                 progress=not args.quiet, eval_tokens=eval_tokens, on_evaluation=on_evaluation,
                 stop_after=args.stop_after)
    if not distributed.is_main_process():
        return 0
    atomic_write_text(out / "result.json", fitted.result.to_json())
    last = fitted.result.history[-1] if fitted.result.history else {}
    # The held-out record of this run only: a resume without --eval-data keeps older ones.
    held_out = fitted.result.validation[-1] if fitted.result.validation else None
    if held_out is not None and held_out["step"] != fitted.result.steps_done:
        held_out = None
    print(json.dumps({"steps": fitted.result.steps_done, "train_tokens": fitted.result.train_tokens,
                      "last": last, **({"held_out": held_out} if held_out else {}),
                      "checkpoint": fitted.result.checkpoint,
                      "checkpoint_bytes": fitted.result.checkpoint_bytes}))
    return 0


def _teacher_text(args: argparse.Namespace) -> int:
    import torch

    from ..data import check_token_path, load_tokens, save_tokens
    from ..lm import load_lm
    from ..decode.lm_text import check_generation_settings, teacher_tokens, write_teacher_store

    out = Path(args.out)
    single = out.suffix == ".safetensors"  # one token file, as before the store existed
    if single and (args.resume or args.shard_tokens is not None):
        raise ValueError("--resume and --shard-tokens need a token store: give --out a folder, not a .safetensors file")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    min_distinct = args.min_distinct if args.min_distinct is not None else (0.0 if single else 0.5)
    shard_tokens = args.shard_tokens or DEFAULT_SHARD_TOKENS
    settings = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch_size": args.batch_size,
                "temperature": args.temperature, "top_k": args.top_k or None, "top_p": args.top_p,
                "min_distinct": min_distinct}
    # Everything that can be refused is refused before the LM is read and the generation starts.
    check_generation_settings(n_tokens=args.tokens, shard_tokens=shard_tokens, **settings)
    if single:
        check_token_path(out)
    if out.exists() and not (args.overwrite or args.resume) and not (out.is_dir() and not any(out.iterdir())):
        again = "" if single else "--resume to continue it or "
        raise FileExistsError(f"{out} exists; pass {again}--overwrite to replace it")
    lm, tokenizer = load_lm(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    corpus = load_tokens(args.data, tokenizer)
    common = dict(n_tokens=args.tokens, seed=args.seed, device=args.device, compile=args.compile,
                  progress=not args.quiet, **settings)
    if single:
        tokens = teacher_tokens(lm, corpus, **common)
        save_tokens(out, tokens, metadata={"ppn_bayes": "teacher-text", "model": str(args.model),
                                           "corpus": str(args.data),
                                           "settings": json.dumps(settings | {"seed": args.seed})})
        written, stats = int(tokens.numel()), {}
    else:
        store = write_teacher_store(lm, corpus, out, tokenizer=tokenizer, shard_tokens=shard_tokens,
                                    source={"model": str(args.model), "data": str(args.data)},
                                    resume=args.resume, overwrite=args.overwrite, **common)
        written, stats = store.numel(), store.source.get("stats", {})
    print(json.dumps({"out": str(out), "tokens": written, **stats, **settings, "seed": args.seed}))
    return 0
