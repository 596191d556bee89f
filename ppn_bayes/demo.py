"""The main job on an embedded default: pretrain a tiny LM, fit it, compare with random cuts.

Nothing is fetched: the text ships with the package (``resources/corpus.txt``) and the LM
is a small Llama built from a config. With ``model=`` a local Hugging Face directory or a
GGUF file is fitted instead (no pretraining).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .core.config import FitConfig, check_fields
from .data import CharTokenizer, TokenBlocks, embedded_text, tokenize
from .inspect.evaluate import perplexity
from .train import fit, versions
from .io import atomic_write_text
from .lm import load_lm, tiny_llama
from .core.ranking import Ranking

__all__ = ["DemoConfig", "DemoResult", "run_demo", "pretrain", "demo_lm"]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    out: str = "runs/demo"
    model: str | None = None  # a local HF directory or .gguf file; None: the tiny default
    text: str | None = None  # a local text file; None: the embedded text
    sizes: tuple[float, ...] = (0.9, 0.7, 0.5, 0.4, 0.3)
    pretrain_steps: int = 400
    fit: FitConfig = field(default_factory=lambda: FitConfig(
        steps=150, batch_size=16, seq_len=128, lr_lm=3e-4, lr_guide=5e-2, size_min=0.25, log_every=10,
    ))
    eval_windows: int = 40
    random_cuts: int = 3
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self):
        check_fields(self)  # types, and no NaN or infinity anywhere
        for size in self.sizes:
            if not 0 < size <= 1:
                raise ValueError(f"sizes must lie in (0, 1], got {size}")
        if self.pretrain_steps < 0 or self.eval_windows < 1 or self.random_cuts < 1:
            raise ValueError("pretrain_steps must be >= 0, eval_windows and random_cuts >= 1")


@dataclass
class DemoResult:
    dense_ppl: float
    rows: list[dict]
    fit: dict
    out: str
    versions: dict = field(default_factory=versions)

    def table(self) -> str:
        lines = [f"dense perplexity: {self.dense_ppl:.3f}",
                 f"{'size':>6} {'reached':>8} {'ppn_bayes':>10} {'random cut':>11} {'better':>7}"]
        for row in self.rows:
            lines.append(
                f"{row['size_requested']:>6.2f} {row['size_reached']:>8.3f} {row['ppl_ppn']:>10.3f} "
                f"{row['ppl_random']:>11.3f} {'yes' if row['ppl_ppn'] < row['ppl_random'] else 'no':>7}"
            )
        return "\n".join(lines)


def demo_lm(vocab_size: int, seed: int = 0):
    """The demo's tiny Llama (4 layers, 128 wide, 2 KV heads of 4), untrained, for ``vocab_size`` tokens."""
    return tiny_llama(vocab_size, layers=4, hidden=128, heads=4, kv_heads=2, intermediate=512, seed=seed)


def pretrain(lm, blocks: TokenBlocks, *, steps: int, batch_size: int, lr: float = 3e-3, progress: bool = True):
    """Plain next-token training (AdamW, warm-up then cosine decay) of a freshly built LM."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    lm.train()
    for step in tqdm(range(steps), disable=not progress, desc="pretrain", unit="step"):
        x = blocks.batch(step, batch_size)  # [B, T]
        logits = lm(input_ids=x, use_cache=False).logits  # training: no KV cache
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    lm.eval()
    return lm


def _plot(path: Path, dense: float, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    sizes = [r["size_reached"] for r in rows]
    ax.plot(sizes, [r["ppl_ppn"] for r in rows], "o-", label="ppn_bayes")
    ax.plot(sizes, [r["ppl_random"] for r in rows], "s--", label="random cut (mean)")
    ax.axhline(dense, color="grey", lw=0.8, label="dense")
    ax.set_xlabel("size (kept fraction of decoder parameters)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def run_demo(config: DemoConfig = DemoConfig(), *, progress: bool = True) -> DemoResult:
    """Fit a push puppet network and compare its sub-networks with random cuts.

    Writes ``table.txt``, ``result.json``, ``perplexity.png`` and the fit's checkpoint
    (``checkpoint/``) under ``config.out``.
    """
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace its files")
    text = Path(config.text).read_text(encoding="utf-8") if config.text else embedded_text()
    if config.model is None:
        tokenizer = CharTokenizer.for_text(text)
        lm = demo_lm(tokenizer.vocab_size, seed=config.seed)
    else:
        lm, tokenizer = load_lm(config.model)
    tokens = tokenize(text, tokenizer)
    train, held_out = TokenBlocks(tokens, config.fit.seq_len, config.seed).split(0.1)
    if config.model is None and config.pretrain_steps:
        pretrain(lm, train, steps=config.pretrain_steps, batch_size=config.fit.batch_size, progress=progress)
    dense = perplexity(lm, held_out.tokens, seq_len=config.fit.seq_len, limit=config.eval_windows).ppl

    out.mkdir(parents=True, exist_ok=True)
    fitted = fit(lm, train, config.fit, checkpoint=out / "checkpoint", tokenizer=tokenizer, progress=progress)
    ranking = fitted.ranking()
    rows = []
    for size in config.sizes:
        masks = ranking.masks(size)
        ppl = perplexity(lm, held_out.tokens, seq_len=config.fit.seq_len, masks=masks, limit=config.eval_windows).ppl
        random_ppls = []
        for seed in range(config.random_cuts):
            # A random cut of the same size, from the same fitted LM.
            cut = Ranking.random(fitted.arch, seed=config.seed * 1000 + seed).masks(size)
            random_ppls.append(
                perplexity(lm, held_out.tokens, seq_len=config.fit.seq_len, masks=cut, limit=config.eval_windows).ppl
            )
        rows.append({
            "size_requested": size,
            "size_reached": masks.size_reached,
            "layers_kept": int(masks.layer.sum()),
            "units_kept": int(masks.unit.sum()),
            "ppl_ppn": ppl,
            "ppl_random": math.exp(sum(map(math.log, random_ppls)) / len(random_ppls)),
            "ppl_random_each": random_ppls,
        })
    result = DemoResult(dense_ppl=dense, rows=rows, fit=fitted.result.to_dict(), out=str(out))
    atomic_write_text(out / "table.txt", result.table() + "\n")
    atomic_write_text(out / "result.json", json.dumps(
        {**dataclasses.asdict(result), "config": {**dataclasses.asdict(config), "fit": config.fit.to_dict()}},
        indent=1, default=str))
    _plot(out / "perplexity.png", dense, rows)
    return result
