"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2``: the tiny fits of
``dist_fit_cases.CASES`` with DDP and FSDP2 on gloo. Every process writes the fit it
returned (``rankR.safetensors``); rank 0 writes ``result.json``.

The case ``fsdp-resume`` stops at step 2, keeps a copy of that checkpoint
(``checkpoint-step2``), then resumes to the end. ``--cli`` then runs ``ppn-bayes fit`` on
a saved tiny LM (folder ``cli``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_fit_cases import CASES, case_eval_tokens, case_lm, case_tokens  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ppn_bayes.fit import fit  # noqa: E402


def run(name: str, out: Path) -> None:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    config = CASES[name]["config"]
    config = config.replace(batch_size=config.batch_size // world)
    folder = out / name
    checkpoint = folder / "checkpoint"
    if name == "fsdp-resume":
        fit(case_lm(name), case_tokens(), config.replace(steps=2), checkpoint=checkpoint, progress=False)
        if rank == 0:
            shutil.copytree(checkpoint, folder / "checkpoint-step2")
        dist.barrier()
        fitted = fit(case_lm(name), case_tokens(), config, checkpoint=checkpoint, resume=True, progress=False)
    else:
        fitted = fit(case_lm(name), case_tokens(), config, checkpoint=checkpoint, progress=False,
                     eval_tokens=case_eval_tokens(name))
    tensors = {f"guide.{k}": v.detach().cpu().contiguous() for k, v in fitted.guide.state_dict().items()}
    tensors.update({f"lm.{k}": v.detach().cpu().clone().contiguous() for k, v in fitted.lm.state_dict().items()})
    if fitted.adapters is not None:
        tensors.update({f"adapters.{k}": v.detach().cpu().contiguous()
                        for k, v in fitted.adapters.state_dict().items()})
    save_file(tensors, folder / f"rank{rank}.safetensors")
    if rank == 0:
        (folder / "result.json").write_text(fitted.result.to_json())


def run_cli(out: Path) -> None:
    """``ppn-bayes fit`` as a user runs it under torchrun (after a fit: the group exists)."""
    from safetensors.torch import save_file as save_tensors

    from ppn_bayes.cli import main as cli
    from ppn_bayes.data import CharTokenizer
    from ppn_bayes.lm import save_lm

    folder = out / "cli"
    if int(os.environ["RANK"]) == 0:
        save_lm(case_lm("ddp"), CharTokenizer("".join(chr(32 + i) for i in range(97))), folder / "lm")
        save_tensors({"tokens": case_tokens()}, folder / "tokens.safetensors")
    dist.barrier()
    code = cli(["fit", "--model", str(folder / "lm"), "--data", str(folder / "tokens.safetensors"),
                "--out", str(folder / "run"), "--quiet", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                "--mlp-group", "32"])
    assert code == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="names of dist_fit_cases.CASES")
    parser.add_argument("--cli", action="store_true", help="also run `ppn-bayes fit` under torchrun")
    args = parser.parse_args()
    for name in args.cases:
        run(name, Path(args.out))
    if args.cli:
        run_cli(Path(args.out))


if __name__ == "__main__":
    main()
