"""Where a compressed network's extra loss goes, token by token.

``quality.py --token-nll-dir DIR`` keeps every evaluated token's NLL (one file per record).
This script packs such a folder into one file small enough to bring back from the GPU
machine, and analyses a packed file here on the CPU:

    python benchmarks/token_nll.py pack DIR [DIR ...] OUT.safetensors
    python benchmarks/token_nll.py analyse OUT.safetensors --tokenizer MODEL [--against dense@1]
                                                          [--records-dir docs/benchmarks/records]

The analysis compares each network with the reference (the dense LM) on the same tokens:
its excess loss (mean NLL difference) by context length (doubling buckets) and by the kind
of token predicted, and the tokens that carry most of it. The kinds are read from the
token's text: WikiText's markup (``@-@``, ``@,@``, ``@.@``, `` = `` headings, ``<unk>``),
punctuation, digits, the start of a word (a leading space or newline), the inside of a
word, and whitespace. With ``--records-dir`` the figures go to ``token_nll.jsonl`` as
records (``benchmarks/report.py`` shows them).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from ppn_bayes.inspect.evaluate import context_buckets
from ppn_bayes.io import atomic_file
from ppn_bayes.records import append_record, read_records

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import lm_rate  # noqa: E402

#: The kinds of token, in the order they are tested (the first that matches).
KINDS = ("markup", "punctuation", "digits", "whitespace", "word start", "word inside")
#: WikiText's markup: its hyphen, comma and point inside words and numbers, unknown words,
#: and heading lines (`` = = Title = = ``).
MARKUP = re.compile(r" @[-,.]@ |<unk>|^ ?(=+) [^\n]* \1 ?$", re.MULTILINE)
_PUNCT = re.compile(r"^\s*[^\w\s]+\s*$")
_DIGITS = re.compile(r"^\s*\d+\s*$")
#: Packed files come back from the GPU machine: at most this much (its limit per file).
PACK_LIMIT = 16 * 2**20


def kinds_of(texts: list[str]) -> list[str]:
    """The kind (:data:`KINDS`) of each token of a run of tokens given by their texts: markup
    where the token's characters overlap a :data:`MARKUP` match of the joined text (markup
    spans several tokens), else by the token's own text."""
    joined = "".join(texts)
    markup = torch.zeros(len(joined) + 1, dtype=torch.bool)
    for match in MARKUP.finditer(joined):
        markup[match.start():match.end()] = True
    out, at = [], 0
    for text in texts:
        if text and bool(markup[at:at + len(text)].any()):
            out.append("markup")
        elif _PUNCT.match(text):
            out.append("punctuation")
        elif _DIGITS.match(text):
            out.append("digits")
        elif not text.strip():
            out.append("whitespace")
        else:
            out.append("word start" if text[0].isspace() else "word inside")
        at += len(text)
    return out


def pack(folders: list[Path], out: Path) -> dict:
    """Every ``METHOD@SIZE.safetensors`` of ``folders`` (each with its ``targets.safetensors``,
    all of the same windows) in one file: ``targets`` and ``nll/METHOD@SIZE`` tensors, each
    one's NLL as quality.py recorded it in the metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors, metadata = {}, {}
    for folder in map(Path, folders):
        if not (folder / "targets.safetensors").is_file():
            raise SystemExit(f"{folder}: no targets.safetensors (is it a --token-nll-dir of quality.py?)")
        with safe_open(str(folder / "targets.safetensors"), "pt") as f:
            targets = f.get_tensor("targets")
        if "targets" in tensors and not torch.equal(tensors["targets"], targets):
            raise SystemExit(f"{folder}: other evaluation windows than {folders[0]}'s; pack them apart")
        tensors["targets"] = targets
        for path in sorted(folder.glob("*@*.safetensors")):
            with safe_open(str(path), "pt") as f:
                nll = f.get_tensor("nll")
                meta = f.metadata() or {}
            if nll.shape != targets.shape:
                raise SystemExit(f"{path}: losses of shape {tuple(nll.shape)}, but the targets are "
                                 f"{tuple(targets.shape)}")
            if path.stem in metadata:
                raise SystemExit(f"{path.stem} is in two of the folders; pack them apart")
            tensors[f"nll/{path.stem}"] = nll
            metadata[path.stem] = meta.get("nll", "")
    if not metadata:
        raise SystemExit(f"{', '.join(map(str, folders))}: no METHOD@SIZE.safetensors to pack")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > PACK_LIMIT:
        raise SystemExit(f"{size / 2**20:.1f} MiB of tensors: more than the {PACK_LIMIT // 2**20} MiB a file may "
                         "have to come back; pack fewer records (move some files out of the folder)")
    with atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return {"file": str(out), "records": sorted(metadata), "bytes": size}


def analyse(packed: Path, tokenizer, *, against: str = "dense@1", top: int = 12,
            reference: Path | None = None) -> list[dict]:
    """One summary per network in ``packed`` other than ``against``: its mean NLL, its excess
    over ``against`` in all, by context bucket and by kind of token (mean excess and share of
    the total), and the ``top`` token texts with the largest total excess. ``reference``: another
    packed file of the same windows to take ``against``'s losses from (the dense LM's are the
    same for every fit, so one run's file serves the next)."""
    from safetensors import safe_open

    with safe_open(str(packed), "pt") as f:
        names = [k[len("nll/"):] for k in f.keys() if k.startswith("nll/")]
        targets = f.get_tensor("targets").long()
        losses = {name: f.get_tensor(f"nll/{name}").double() for name in names}
    if reference is not None:
        with safe_open(str(reference), "pt") as f:
            held = [k[len("nll/"):] for k in f.keys() if k.startswith("nll/")]
            if against not in held:
                raise SystemExit(f"{reference}: no losses of {against!r} to compare with; it holds {', '.join(held)}")
            if not torch.equal(f.get_tensor("targets").long(), targets):
                raise SystemExit(f"{reference}: other evaluation windows than {packed}'s; its {against} losses "
                                 "do not line up with them")
            losses[against] = f.get_tensor(f"nll/{against}").double()
    elif against not in names:
        raise SystemExit(f"{packed}: no losses of {against!r} to compare with; it holds {', '.join(names)} "
                         "(--reference FILE takes them from another packed file of the same windows)")
    names = sorted(losses)
    ids = targets.flatten()
    texts = {int(i): tokenizer.decode([int(i)]) for i in ids.unique()}
    kinds = torch.tensor([KINDS.index(k) for row in targets.tolist()  # [N]: markup read window by window
                          for k in kinds_of([texts[i] for i in row])])
    reference = losses[against].flatten()
    out = []
    for name in sorted(n for n in names if n != against):
        excess = losses[name].flatten() - reference  # [N]
        total = float(excess.sum())
        by_context = {}
        grid = excess.view(targets.shape)
        for lo, hi in context_buckets(targets.shape[1]):
            by_context[f"{lo}-{hi}" if hi > lo else f"{lo}"] = float(grid[:, lo - 1:hi].mean())
        short, long = grid[:, :63], grid[:, 511:]  # columns j predict from j + 1 tokens
        by_kind = {}
        for k, kind in enumerate(KINDS):
            picked = excess[kinds == k]
            if picked.numel():
                by_kind[kind] = {"tokens": picked.numel(), "share_of_tokens": picked.numel() / ids.numel(),
                                 "mean_excess": float(picked.mean()), "share_of_excess": float(picked.sum()) / total}
        per_id = torch.zeros(int(ids.max()) + 1, dtype=torch.float64).index_add_(0, ids, excess)
        worst = per_id.argsort(descending=True)[:top]
        out.append({"network": name, "against": against, "tokens": ids.numel(),
                    "nll": float(losses[name].mean()), "nll_against": float(reference.mean()),
                    "mean_excess": float(excess.mean()), "by_context": by_context, "by_kind": by_kind,
                    "excess_context_below_64": float(short.mean()) if short.numel() else None,
                    "excess_context_from_512": float(long.mean()) if long.numel() else None,
                    "top_tokens": [{"text": texts.get(int(i), ""), "share_of_excess": float(per_id[i]) / total,
                                    "count": int((ids == i).sum())} for i in worst]})
    return out


def markdown(summaries: list[dict]) -> str:
    """The summaries as three tables: by context, by kind, the tokens that cost most."""
    if not summaries:
        return "(nothing to compare)"
    contexts = list(summaries[0]["by_context"])
    lines = [f"Excess NLL over {summaries[0]['against']} (nats per token) by context length (tokens before the one "
             "predicted):", "", "| network | all | " + " | ".join(contexts) + " |",
             "|---|---|" + "---|" * len(contexts)]
    for s in summaries:
        lines.append(f"| {s['network']} | {s['mean_excess']:.3f} | "
                     + " | ".join(f"{s['by_context'][c]:.3f}" for c in contexts) + " |")
    lines += ["", "By kind of token predicted: mean excess (share of the total excess; share of the tokens):", "",
              "| network | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for s in summaries:
        cells = []
        for kind in KINDS:
            k = s["by_kind"].get(kind)
            cells.append("–" if k is None else
                         f"{k['mean_excess']:.3f} ({k['share_of_excess']:.0%}; {k['share_of_tokens']:.0%})")
        lines.append(f"| {s['network']} | " + " | ".join(cells) + " |")
    lines += ["", "The tokens that carry most of the excess (share of the total, occurrences):", ""]
    for s in summaries:
        tops = ", ".join(f"{t['text']!r} {t['share_of_excess']:.1%} ({t['count']})" for t in s["top_tokens"])
        lines.append(f"- {s['network']}: {tops}")
    return "\n".join(lines)


def recorded_nll(packed: Path) -> dict[str, float]:
    """Each packed network's NLL as its quality record holds it (``pack`` keeps it)."""
    from safetensors import safe_open

    with safe_open(str(packed), "pt") as f:
        return {name: float(value) for name, value in (f.metadata() or {}).items() if value}


def source_of(network: str, nll: float | None, quality: list[dict]) -> str | None:
    """The quality record a network's losses came from (its method, size and recorded NLL, to
    the bit), told by its date, training tokens and the LM's rate and beta2: which of several
    runs of one method the split describes."""
    method, _, size = network.partition("@")
    for r in reversed(quality):
        if r.get("method") == method and r.get("nll") == nll and size and \
                round(float(r.get("size_requested", 1.0)), 4) == round(float(size), 4):
            rate = lm_rate(r)
            told = [str(r.get("date", "?"))[:16], f"{r.get('train_tokens', 0):,} tokens"]
            return ", ".join(told + ([f"lr {rate[0]:g}, beta2 {rate[1]:g}"] if rate else []))
    return None


def _record(summary: dict, records_dir: str, command: str, model: str, source: str | None = None) -> None:
    """One record per network: scalars for the report's table (the excess in all, over the
    first 63 predicted tokens of a window and from the 512th on, each kind's share; the quality
    record it came from), the buckets and the top tokens in full beside them."""
    method, _, size = summary["network"].partition("@")
    figures = {f"share_{kind.replace(' ', '_')}": k["share_of_excess"] for kind, k in summary["by_kind"].items()}
    append_record("token_nll", method=method, model=model, records_dir=records_dir, command=command, source=source,
                  size_requested=float(size) if size else None, against=summary["against"], tokens=summary["tokens"],
                  nll=summary["nll"], nll_against=summary["nll_against"], mean_excess=summary["mean_excess"],
                  excess_context_below_64=summary["excess_context_below_64"],
                  excess_context_from_512=summary["excess_context_from_512"], **figures,
                  by_context=summary["by_context"], by_kind=summary["by_kind"], top_tokens=summary["top_tokens"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="--token-nll-dir folders of the same evaluation windows into one file")
    a.add_argument("folders", type=Path, nargs="+")
    a.add_argument("out", type=Path)
    b = sub.add_parser("analyse", help="where each network's excess loss goes")
    b.add_argument("packed", type=Path)
    b.add_argument("--tokenizer", required=True,
                   help="the model (GGUF or Hugging Face folder) whose tokenizer made the evaluation's tokens")
    b.add_argument("--against", default="dense@1", help="the reference network (default: dense@1)")
    b.add_argument("--reference", type=Path, default=None,
                   help="a packed file of the same windows that holds --against's losses, when PACKED does not")
    b.add_argument("--top", type=int, default=12, help="tokens listed per network (default: 12)")
    b.add_argument("--records-dir", default=None, help="append one token_nll record per network here")
    b.add_argument("--model-name", default=None, help="the model's name in the records (default: the file's stem)")
    args = p.parse_args(argv)
    if args.command == "pack":
        print(pack(args.folders, args.out))
        return 0
    for path in (args.packed, args.reference):
        if path is not None and not path.is_file():
            raise SystemExit(f"{path}: no such file")
    from ppn_bayes.lm import load_lm, load_tokenizer

    source = Path(args.tokenizer)
    tokenizer = load_lm(source)[1] if source.suffix == ".gguf" else load_tokenizer(source)
    summaries = analyse(args.packed, tokenizer, against=args.against, top=args.top, reference=args.reference)
    print(markdown(summaries))
    if args.records_dir:
        command = "python benchmarks/token_nll.py " + " ".join(argv if argv is not None else sys.argv[1:])
        nll, quality = recorded_nll(args.packed), read_records("quality", args.records_dir)
        for s in summaries:
            _record(s, args.records_dir, command, args.model_name or source.name.split(".")[0],
                    source_of(s["network"], nll.get(s["network"]), quality))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
