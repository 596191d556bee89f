"""``ppn-bayes summarize``: ArviZ tables and plots of a fitted gate posterior."""

from __future__ import annotations

import argparse
import json

from .options import open_fraction, positive_int, size_fraction, unit_interval


def register(subparsers) -> None:
    """Add the ``summarize`` subcommand."""
    from ..inspect.posterior import DEFAULT_SIZES

    summarize = subparsers.add_parser(
        "summarize", help="ArviZ summary, keep curves, forest plot and ambiguous units of a fit",
        description="Draw the gate posterior of a fit checkpoint at several sizes and write, into "
                    "OUT: summary.csv (mean, sd, HDI, MCSE, ESS of every variable, at --table-sizes), posterior.nc (the "
                    "ArviZ InferenceData, netCDF), keep_curves.png (keep probability against size, per "
                    "layer and unit), forest.png (keep probabilities at --size) and ambiguous.json "
                    "(units with keep probability between --low and --high at --size); for a fit evaluated with "
                    "--eval-sizes, also masks_over_fit.json and masks_over_fit_SIZE.png (the attention and MLP "
                    "units each layer of the deployed sub-network kept at each evaluation, and its held-out "
                    "perplexity: where the ranking still moved).",
    )
    summarize.add_argument("checkpoint", metavar="CHECKPOINT",
                           help="a fit checkpoint directory (e.g. OUT/checkpoint of ppn-bayes fit)")
    summarize.add_argument("--out", required=True, help="output folder (refused if it exists, see --overwrite)")
    summarize.add_argument("--sizes", type=size_fraction, nargs="+", default=list(DEFAULT_SIZES),
                           help="sizes to draw at, fractions in (0, 1] (default: 0.1, 0.15, ..., 1.0)")
    summarize.add_argument("--size", type=size_fraction, default=0.5,
                           help="size of the forest plot and the ambiguous units (default: 0.5)")
    summarize.add_argument("--table-sizes", type=size_fraction, nargs="+", default=None,
                           help="sizes of the size-dependent rows of summary.csv (default: --size; "
                                "posterior.nc holds every size)")
    summarize.add_argument("--draws", type=positive_int, default=200, help="draws from the guide (default: 200)")
    summarize.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    summarize.add_argument("--hdi-prob", type=open_fraction, default=0.94,
                           help="probability mass of the highest-density intervals (default: 0.94)")
    summarize.add_argument("--low", type=unit_interval, default=0.1,
                           help="lower bound of an ambiguous keep probability (default: 0.1)")
    summarize.add_argument("--high", type=unit_interval, default=0.9,
                           help="upper bound of an ambiguous keep probability (default: 0.9)")
    summarize.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    summarize.set_defaults(func=_summarize)


def _summarize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..train import load_fit
    from ..inspect.posterior import check_sizes, write_summary

    # Refuse bad input before the (possibly large) checkpoint is loaded.
    check_sizes([*args.sizes, args.size, *(args.table_sizes or [])])
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    fitted = load_fit(args.checkpoint)
    written = write_summary(
        fitted, args.out, sizes=args.sizes, size=args.size, table_sizes=args.table_sizes, n_draws=args.draws,
        seed=args.seed, hdi_prob=args.hdi_prob, low=args.low, high=args.high, overwrite=args.overwrite,
    )
    print(json.dumps(written))
    return 0
