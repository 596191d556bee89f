"""``ppn-bayes masks``, ``export-ranked``, ``resize``, ``distill`` and ``eval``: from a fit to deployment."""

from __future__ import annotations

import argparse
import json

from .options import add_config_options, config_from, positive_float, positive_int, size_fraction

_DTYPES = ["float32", "bfloat16", "float16"]


def _size_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--size", type=size_fraction, default=None,
                       help="kept fraction of the decoder's parameters, in (0, 1]")
    group.add_argument("--params", type=positive_int, default=None,
                       help="kept decoder parameters, instead of --size")


def register(subparsers) -> None:
    """Add ``masks``, ``export-ranked``, ``resize``, ``distill`` and ``eval`` to the ``ppn-bayes`` parser."""
    masks = subparsers.add_parser(
        "masks", help="write the mask file of a fitted network for some sizes",
        description="Write a versioned, validated mask file (JSON): the base model's identity, the unit "
                    "definitions and costs, the ranking, and one mask per requested size. CHECKPOINT is a fit "
                    "checkpoint (OUT/checkpoint of `ppn-bayes fit`; its LM is loaded) or a ranked checkpoint "
                    "(`ppn-bayes export-ranked`; nothing large is read). The masks refer to the fitted LM's own "
                    "unit order either way.",
    )
    masks.add_argument("checkpoint", metavar="CHECKPOINT", help="a fit checkpoint or a ranked checkpoint")
    masks.add_argument("--sizes", type=size_fraction, nargs="+", default=[],
                       help="sizes (fractions of decoder parameters in (0, 1]) to write masks for")
    masks.add_argument("--params", type=positive_int, nargs="+", default=[],
                       help="decoder parameter budgets to write masks for")
    masks.add_argument("--out", required=True, help="the mask file to write (JSON)")
    masks.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    masks.set_defaults(func=_masks)

    export = subparsers.add_parser(
        "export-ranked", help="store a fit with every layer's units sorted by rank (for resize)",
        description="Write a ranked checkpoint: the fitted LM with each layer's attention units and MLP groups "
                    "sorted by the ranking (which leaves its function unchanged), so that the units kept at any "
                    "size are a prefix of every tensor. `ppn-bayes resize` then reads only those prefixes.",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a fit checkpoint (OUT/checkpoint of `ppn-bayes fit`)")
    export.add_argument("--out", required=True, help="the ranked checkpoint directory to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.set_defaults(func=_export)

    resize = subparsers.add_parser(
        "resize", help="cut a sub-network of a given size and save it",
        description="Cut the sub-network of --size (or --params) and save it (safetensors + JSON). CHECKPOINT is "
                    "a ranked checkpoint, read slice by slice without ever loading the full LM, or a fit "
                    "checkpoint, which is first exported to a ranked one (loading the full LM once; keep it with "
                    "--keep-ranked DIR to resize again cheaply; a fit with size adapters, whose sizes each have "
                    "weights of their own, is cut from the whole fit and refuses --keep-ranked). The result loads with "
                    "ppn_bayes.load_subnetwork, and with AutoModelForCausalLM.from_pretrained when every layer "
                    "keeps the same widths.",
    )
    resize.add_argument("checkpoint", metavar="CHECKPOINT", help="a ranked checkpoint or a fit checkpoint")
    _size_options(resize, required=True)
    resize.add_argument("--out", required=True, help="the sub-network directory to write")
    resize.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    resize.add_argument("--keep-ranked", default=None,
                        help="with a fit checkpoint: where to keep the ranked checkpoint made on the way")
    resize.add_argument("--dtype", default=None, choices=_DTYPES,
                        help="store the sub-network in this dtype (default: the checkpoint's)")
    resize.set_defaults(func=_resize)

    distill = subparsers.add_parser(
        "distill", help="fine-tune one sub-network towards the full LM (optional, after a fit)",
        description="Cut the sub-network of --size (or --params) from CHECKPOINT (a fit or ranked checkpoint) "
                    "and fine-tune it alone by self-distillation: its next-token loss plus --distill-weight times "
                    "KL(teacher || sub-network) per token, AdamW, windows of --seq-len drawn from --data as the fit "
                    "draws them. The teacher is the checkpoint's full LM, or --teacher. Writes the sub-network "
                    "(as `ppn-bayes resize` does) with distill.json: the settings, the losses and, with "
                    "--eval-data, the held-out perplexity before and after.",
    )
    distill.add_argument("checkpoint", metavar="CHECKPOINT", help="a fit checkpoint or a ranked checkpoint")
    _size_options(distill, required=True)
    distill.add_argument("--data", required=True,
                         help="training text (.txt, tokenised with the model's tokenizer) or a .safetensors file "
                              "with a 1-D 'tokens' tensor")
    distill.add_argument("--out", required=True, help="the sub-network directory to write")
    distill.add_argument("--teacher", default=None,
                         help="the teacher: a model directory, .gguf file or checkpoint (default: CHECKPOINT's full LM)")
    distill.add_argument("--eval-data", default=None, help="held-out text (as --data): perplexity before and after")
    distill.add_argument("--eval-windows", type=positive_int, default=16,
                         help="held-out windows of --seq-len evaluated (default: 16)")
    from ..deploy.finetune import DistillConfig

    add_config_options(distill, DistillConfig, DistillConfig())
    distill.add_argument("--resume", action="store_true", help="continue from OUT.distill-checkpoint")
    distill.add_argument("--stop-after", type=positive_float, default=None, metavar="SECONDS",
                         help="stop at the first step after this long, with a checkpoint in OUT.distill-checkpoint "
                              "that --resume continues (for machines lent in stretches); OUT is not written")
    distill.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    distill.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the forward passes (CUDA only)")
    distill.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    distill.add_argument("--quiet", action="store_true", help="no progress bar")
    distill.set_defaults(func=_distill)

    evaluate = subparsers.add_parser(
        "eval", help="perplexity of a model or sub-network on a text file",
        description="Perplexity on a local text file: the whole file tokenised at once with the model's "
                    "tokenizer, non-overlapping windows of --seq-len tokens, the remainder dropped. MODEL is a "
                    "Hugging Face directory, a .gguf file, a sub-network directory, a fit checkpoint (cut with "
                    "--size by its own ranking) or a ranked checkpoint (resized to --size).",
    )
    evaluate.add_argument("model", metavar="MODEL", help="a model directory, .gguf file or checkpoint")
    evaluate.add_argument("--data", required=True, help="a local text file (or .safetensors with 1-D 'tokens')")
    evaluate.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per window (default: 2048)")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="evaluate at most this many windows")
    evaluate.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default: 8)")
    evaluate.add_argument("--masks", default=None, help="a mask file (`ppn-bayes masks`) to cut MODEL with")
    _size_options(evaluate, required=False)
    evaluate.add_argument("--masked-dense", action="store_true",
                          help="evaluate the full LM under the masks (the slow reference) instead of the sub-network")
    evaluate.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    evaluate.add_argument("--dtype", default="float32", choices=_DTYPES, help="weights' dtype (default: float32)")
    evaluate.add_argument("--json", action="store_true", help="print the result as one JSON object")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_eval)


def _dtype(name):
    import torch

    return getattr(torch, name) if name is not None else None


def _masks(args: argparse.Namespace) -> int:
    from ..deploy.artifacts import export_masks

    written = export_masks(args.checkpoint, args.out, sizes=args.sizes, n_params=args.params,
                           overwrite=args.overwrite)
    rows = [{"size_requested": m.size_requested, "size_reached": m.size_reached, "kept_params": m.kept_params}
            for m in written.masks]
    print(json.dumps({"out": args.out, "masks": rows}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..deploy.artifacts import checkpoint_kind
    from ..deploy.resize import export_ranked

    if checkpoint_kind(args.checkpoint) != "fit":
        raise ValueError(f"{args.checkpoint} is not a fit checkpoint (it has no state.json)")
    out = export_ranked(args.checkpoint, args.out, overwrite=args.overwrite)
    print(json.dumps({"out": str(out)}))
    return 0


def _resize(args: argparse.Namespace) -> int:
    from ..deploy.artifacts import resize_checkpoint

    result = resize_checkpoint(args.checkpoint, args.out, size=args.size, n_params=args.params,
                               overwrite=args.overwrite, keep_ranked=args.keep_ranked, dtype=_dtype(args.dtype))
    print(json.dumps(result.to_dict()))
    return 0


def _distill(args: argparse.Namespace) -> int:
    from ..deploy.finetune import DistillConfig, distill_checkpoint

    config = DistillConfig(**config_from(args, DistillConfig))
    report = distill_checkpoint(args.checkpoint, args.data, args.out, size=args.size, n_params=args.params,
                                teacher=args.teacher, config=config, eval_data=args.eval_data,
                                eval_windows=args.eval_windows, device=args.device, bf16=args.bf16,
                                overwrite=args.overwrite, progress=not args.quiet, resume=args.resume,
                                stop_after=args.stop_after)
    if "stopped_at" in report:
        print(json.dumps({"stopped_at": report["stopped_at"], "steps": report["result"]["steps"],
                          "checkpoint": report["resume_from"], "resume": "the same command with --resume"}))
        return 0
    summary = {"out": args.out, "size_reached": report["size_reached"], "steps": report["result"]["steps"],
               "train_tokens": report["result"]["train_tokens"], "final_loss": report["result"]["history"][-1]}
    if "eval" in report:
        summary.update(ppl_before=report["eval"]["ppl_before"], ppl_after=report["eval"]["ppl_after"])
    print(json.dumps(summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..inspect.evaluate_file import evaluate_model

    record = evaluate_model(args.model, args.data, seq_len=args.seq_len, limit=args.limit,
                            batch_size=args.batch_size, size=args.size, n_params=args.params,
                            masks_file=args.masks, masked_dense=args.masked_dense, device=args.device,
                            dtype=_dtype(args.dtype), progress=not args.quiet)
    # Tokens evaluated (whole windows, at most --limit of them), not the file's length.
    record.update(file_tokens=record["tokens"], tokens=record["windows"] * record["seq_len"])
    if args.json:
        print(json.dumps(record))
    else:
        cut = f" at size {record['size_reached']:.4f}" if "size_reached" in record else ""
        print(f"{record['model']}{cut}: perplexity {record['ppl']:.3f} over {record['windows']} windows of "
              f"{record['seq_len']} tokens")
    return 0
