# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,-jupytext.text_representation.jupytext_version,-jupytext.text_representation.format_version
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Fit a gate posterior
#
# A push puppet network puts a Bayesian gate on every layer and every unit (a key/value
# group with its query heads, or a group of MLP channels) of a causal LM. One fit of the
# gate posterior `q(log λ)` serves every size: the global scale `τ` is solved from the
# budget equation for whatever size is asked.
#
# This notebook fits it on the **embedded default**: a tiny Llama pretrained briefly on
# the text shipped with `ppn_bayes` (no download, CPU only). Set `PPN_MODEL` to a local
# Hugging Face directory or `.gguf` file to fit a real model instead (and `PPN_TEXT` to a
# local text file to train on). The fit is written to `$PPN_RUN_DIR/fit` (default
# `runs/notebooks/fit`), where the next notebooks find it.
#
# `PPN_SMOKE=1` runs everything on tiny settings (this is what the tests do).

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import ppn_bayes as pb
from ppn_bayes.demo import pretrain

SMOKE = os.environ.get("PPN_SMOKE") == "1"
MODEL = os.environ.get("PPN_MODEL")  # a local HF directory or .gguf file; None: the tiny default
TEXT = os.environ.get("PPN_TEXT")  # a local text file; None: the embedded text
RUN_DIR = Path(os.environ.get("PPN_RUN_DIR", "runs/notebooks"))
torch.manual_seed(0)
print(f"smoke mode: {SMOKE}; model: {MODEL or 'tiny Llama (embedded default)'}; run dir: {RUN_DIR}")

# %% [markdown]
# ## The LM and its text
#
# The embedded default is a character-level Llama (4 layers, 2 key/value groups of 2 query
# heads, MLP width 512) pretrained for a few hundred steps (smaller and shorter in smoke
# mode). A real model is loaded as is.

# %%
text = Path(TEXT).read_text(encoding="utf-8") if TEXT else pb.embedded_text()
if SMOKE:
    text = text[:40_000]
seq_len = 32 if SMOKE else 128
if MODEL is None:
    tokenizer = pb.CharTokenizer.for_text(pb.embedded_text())
    lm = pb.tiny_llama(tokenizer.vocab_size, layers=4, hidden=32 if SMOKE else 128, heads=4, kv_heads=2,
                       intermediate=128 if SMOKE else 512)
else:
    lm, tokenizer = pb.load_lm(MODEL)
tokens = pb.tokenize(text, tokenizer)
train, held_out = pb.TokenBlocks(tokens, seq_len, seed=0).split(0.1)
if MODEL is None:
    pretrain(lm, train, steps=20 if SMOKE else 400, batch_size=4 if SMOKE else 16, progress=False)
mlp_group = 32 if SMOKE else 64  # intermediate channels per MLP unit
arch = pb.describe(lm, mlp_group=mlp_group)
print(f"{arch.n_layers} layers, {arch.n_attention_units} attention units and {arch.n_mlp_units} MLP units "
      f"per layer; decoder parameters C = {arch.total_cost:,}")

# %% [markdown]
# ## The fit
#
# `FitConfig` holds every setting (frozen, validated, saved with the checkpoint). Each step
# trains the full LM, the smallest size `size_min` and a random size between (the sandwich
# rule); the gates and the LM's weights learn together. Every `eval_every` steps the fit
# evaluates the deployed sub-networks at `eval_sizes` on held-out windows and keeps their
# masks (notebook 2 shows how they moved).

# %%
config = pb.FitConfig(
    steps=3 if SMOKE else 150,
    batch_size=2 if SMOKE else 16,
    seq_len=seq_len,
    lr_lm=3e-4,
    lr_guide=5e-2,
    size_min=0.25,
    mlp_group=mlp_group,
    log_every=1 if SMOKE else 10,
    eval_every=1 if SMOKE else 15,
    eval_windows=2 if SMOKE else 8,
    eval_sizes=(0.7, 0.5, 0.3),
)
fitted = pb.fit(lm, train, config, checkpoint=RUN_DIR / "fit", tokenizer=tokenizer, progress=False,
                eval_tokens=held_out.tokens)
print(f"{fitted.result.steps_done} steps, {fitted.result.train_tokens:,} training tokens; "
      f"checkpoint: {fitted.result.checkpoint}")

# %%
history = fitted.result.history
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot([row["step"] for row in history], [row["loss"] for row in history], label="ELBO loss (per token)")
ax.plot([row["step"] for row in history], [row["nll_full"] for row in history], label="full LM, next-token loss")
ax.set_xlabel("step")
ax.legend()
fig.tight_layout()

# %% [markdown]
# ## From the posterior to masks
#
# The deterministic ranking orders layers and units by the `τ` at which their keep
# probability crosses ½ (at the posterior median). The mask for a size is the longest
# prefix of the ranking within budget, so masks are nested across sizes.

# %%
ranking = fitted.ranking()
sizes = [0.9, 0.7, 0.5, 0.3]
window_limit = 4 if SMOKE else 40
dense = pb.perplexity(lm, held_out.tokens, seq_len=seq_len, limit=window_limit).ppl
print(f"dense perplexity {dense:.2f}")
previous = None
for size in sizes:
    masks = ranking.masks(size)
    if previous is not None:
        assert masks <= previous  # nested: a smaller size keeps a subset
    previous = masks
    ppl = pb.perplexity(lm, held_out.tokens, seq_len=seq_len, masks=masks, limit=window_limit).ppl
    cut = pb.Ranking.random(arch, seed=0).masks(size)
    ppl_random = pb.perplexity(lm, held_out.tokens, seq_len=seq_len, masks=cut, limit=window_limit).ppl
    print(f"size {size:.2f}: reached {masks.size_reached:.3f}, {int(masks.layer.sum())} layers, "
          f"{int(masks.unit.sum())} units, perplexity {ppl:.2f} (a random cut: {ppl_random:.2f})")

# %% [markdown]
# Next: `02_uncertainty.py` looks at the posterior behind these masks with ArviZ.
