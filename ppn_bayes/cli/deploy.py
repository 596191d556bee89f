"""``ppn-bayes masks``, ``export-ranked``, ``resize`` and ``eval``: from a fit to deployment."""

from __future__ import annotations

import argparse
import json

_DTYPES = ["float32", "bfloat16", "float16"]


def _size_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--size", type=float, default=None,
                       help="kept fraction of the decoder's parameters, in (0, 1]")
    group.add_argument("--params", type=int, default=None,
                       help="kept decoder parameters, instead of --size")


def register(subparsers) -> None:
    """Add ``masks``, ``export-ranked``, ``resize`` and ``eval`` to the ``ppn-bayes`` parser."""
    masks = subparsers.add_parser(
        "masks", help="write the mask file of a fitted network for some sizes",
        description="Write a versioned, validated mask file (JSON): the base model's identity, the unit "
                    "definitions and costs, the ranking, and one mask per requested size. CHECKPOINT is a fit "
                    "checkpoint (OUT/checkpoint of `ppn-bayes fit`; its LM is loaded) or a ranked checkpoint "
                    "(`ppn-bayes export-ranked`; nothing large is read). The masks refer to the fitted LM's own "
                    "unit order either way.",
    )
    masks.add_argument("checkpoint", metavar="CHECKPOINT", help="a fit checkpoint or a ranked checkpoint")
    masks.add_argument("--sizes", type=float, nargs="+", default=[],
                       help="sizes (fractions of decoder parameters in (0, 1]) to write masks for")
    masks.add_argument("--params", type=int, nargs="+", default=[],
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
                    "--keep-ranked DIR to resize again cheaply). The result loads with "
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

    evaluate = subparsers.add_parser(
        "eval", help="perplexity of a model or sub-network on a text file",
        description="Perplexity on a local text file: the whole file tokenised at once with the model's "
                    "tokenizer, non-overlapping windows of --seq-len tokens, the remainder dropped. MODEL is a "
                    "Hugging Face directory, a .gguf file, a sub-network directory, a fit checkpoint (cut with "
                    "--size by its own ranking) or a ranked checkpoint (resized to --size).",
    )
    evaluate.add_argument("model", metavar="MODEL", help="a model directory, .gguf file or checkpoint")
    evaluate.add_argument("--data", required=True, help="a local text file (or .safetensors with 1-D 'tokens')")
    evaluate.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default: 2048)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate at most this many windows")
    evaluate.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
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
    from ..maskfile import export_masks

    written = export_masks(args.checkpoint, args.out, sizes=args.sizes, n_params=args.params,
                           overwrite=args.overwrite)
    rows = [{"size_requested": m.size_requested, "size_reached": m.size_reached, "kept_params": m.kept_params}
            for m in written.masks]
    print(json.dumps({"out": args.out, "masks": rows}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..resize import checkpoint_kind, export_ranked

    if checkpoint_kind(args.checkpoint) != "fit":
        raise ValueError(f"{args.checkpoint} is not a fit checkpoint (it has no state.json)")
    out = export_ranked(args.checkpoint, args.out, overwrite=args.overwrite)
    print(json.dumps({"out": str(out)}))
    return 0


def _resize(args: argparse.Namespace) -> int:
    from ..resize import resize_checkpoint

    result = resize_checkpoint(args.checkpoint, args.out, size=args.size, n_params=args.params,
                               overwrite=args.overwrite, keep_ranked=args.keep_ranked, dtype=_dtype(args.dtype))
    print(json.dumps(result.to_dict()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..resize import evaluate_model

    record = evaluate_model(args.model, args.data, seq_len=args.seq_len, limit=args.limit,
                            batch_size=args.batch_size, size=args.size, n_params=args.params,
                            masks_file=args.masks, masked_dense=args.masked_dense, device=args.device,
                            dtype=_dtype(args.dtype), progress=not args.quiet)
    if args.json:
        print(json.dumps(record))
    else:
        cut = f" at size {record['size_reached']:.4f}" if "size_reached" in record else ""
        print(f"{record['model']}{cut}: perplexity {record['ppl']:.3f} over {record['windows']} windows of "
              f"{record['seq_len']} tokens")
    return 0
