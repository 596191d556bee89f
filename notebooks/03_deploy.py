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
# # 3. From masks to a deployed sub-network
#
# One fit gives a sub-network of any size. This notebook takes the fit of `01_fit.py`
# (under `$PPN_RUN_DIR/fit`) to deployment:
#
# 1. export the masks as a versioned, validated mask file;
# 2. build the dense sub-network (dropped layers, heads and channels physically removed)
#    and check its logits against the masked full LM;
# 3. resize without the full model, from a ranked checkpoint;
# 4. optionally, fine-tune the chosen size alone towards the full LM (`ppn-bayes distill`);
# 5. compile the sub-network with `torch.compile` and time it (tokens/s on this CPU: a quick
#    look, not a benchmark);
# 6. use it as the draft model of speculative decoding.

# %%
import os
from pathlib import Path

import torch

import ppn_bayes as pb
from ppn_bayes.decode.generation import Decoder, timed_generate
from ppn_bayes.lm import load_tokenizer
from ppn_bayes.deploy.maskfile import load_masks, save_masks
from ppn_bayes.deploy.resize import export_ranked, resize
from ppn_bayes.decode.speculative import speculative_generate
from ppn_bayes.deploy.subnetwork import build_subnetwork, decoder_params, load_subnetwork, subnetwork_widths

SMOKE = os.environ.get("PPN_SMOKE") == "1"
RUN_DIR = Path(os.environ.get("PPN_RUN_DIR", "runs/notebooks"))
checkpoint = RUN_DIR / "fit"
if not (checkpoint / "state.json").is_file():
    raise FileNotFoundError(f"no fit at {checkpoint}: run 01_fit.py first (with the same PPN_RUN_DIR)")
deploy = RUN_DIR / "deploy"
fitted = pb.load_fit(checkpoint)
lm, arch = fitted.lm, fitted.arch
tokenizer = load_tokenizer(checkpoint / "lm")
torch.manual_seed(0)

# %% [markdown]
# ## 1. The mask file
#
# The file carries the base model's identity (tensor names and shapes, a weight
# fingerprint), the unit definitions and costs, the ranking and the masks. Loading it
# against the LM checks all of it: masks for another model are refused.

# %%
ranking = fitted.ranking()
mask_path = save_masks(deploy / "masks.json", ranking, sizes=[0.9, 0.7, 0.5, 0.3], lm=lm, overwrite=True,
                       source=str(checkpoint))
mask_file = load_masks(mask_path, lm)
for masks in mask_file.masks:
    print(f"size {masks.size_requested:.2f}: reached {masks.size_reached:.3f}, "
          f"{int(masks.layer.sum())}/{arch.n_layers} layers, {int(masks.unit.sum())}/{arch.n_layers * arch.n_units} units")

# %% [markdown]
# ## 2. The sub-network, checked against the masked full LM
#
# `build_subnetwork` slices the weights; the slow reference is the full LM with the same
# masks applied as gates (`GatedLM`). Their logits agree up to float rounding, and the
# sub-network's decoder holds exactly the parameters the mask keeps.

# %%
size = 0.5
masks = mask_file.masks_for(size)
sub = build_subnetwork(lm, masks)
prompt_text = pb.embedded_text()[:48]
prompt = pb.tokenize(prompt_text, tokenizer)[None]  # [1, T]
gated = pb.GatedLM(lm, arch)
with torch.no_grad():
    reference = gated(prompt, gates=masks.gates())  # [1, T, V]
    logits = sub(input_ids=prompt).logits  # [1, T, V]
gated.unload()
print(f"max |logits - masked reference| = {float((logits - reference).abs().max()):.2e}")
print(f"decoder parameters: {decoder_params(sub):,} (mask: {masks.kept_params:,}; full: {masks.total_params:,})")
print("per-layer widths:", subnetwork_widths(sub))

# %% [markdown]
# ## 3. Resizing without the full model
#
# A ranked checkpoint stores each layer's units sorted by rank, so every size is a prefix
# of every tensor: `resize` reads only those prefixes (`safe_open(...).get_slice`) and
# never builds the full LM. The result is saved as an ordinary Hugging Face directory and
# loads back with `load_subnetwork`.

# %%
ranked = export_ranked(checkpoint, deploy / "ranked", overwrite=True)
result = resize(ranked, size, deploy / f"sub_{size}", overwrite=True)
print(f"read {result.bytes_read:,} of {result.checkpoint_bytes:,} tensor bytes "
      f"({result.bytes_read / result.checkpoint_bytes:.0%}) in {result.seconds:.2f} s")
loaded = load_subnetwork(deploy / f"sub_{size}")
with torch.no_grad():
    resized_logits = loaded(input_ids=prompt).logits
print(f"max |resized - sliced| = {float((resized_logits - logits).abs().max()):.2e}")

# %% [markdown]
# ## 4. One size, fine-tuned (optional)
#
# The fit serves every size as it is. Once a size is chosen, a short fine-tune of that
# sub-network alone, towards the full LM (its next-token loss plus the KL from the full
# LM, as in the fit), recovers part of what the cut lost; the benchmarks page measures it
# on SmolLM2-135M. `ppn-bayes distill` does the same from the command line and saves the
# result with its losses. Here a copy is tuned, so that the sections below use the
# sub-network as the fit left it. The fine-tune's next-token loss also trains on the text:
# a small or briefly fitted LM can come out ahead of its own full LM on text like it.

# %%
import copy

from ppn_bayes.deploy.finetune import DistillConfig, distill

text_tokens = pb.tokenize(pb.embedded_text(), tokenizer)
cut = int(0.9 * text_tokens.numel())
train_tokens, held_out = text_tokens[:cut], text_tokens[cut:]
tuned = copy.deepcopy(loaded)
seq_len = 64
before = pb.perplexity(tuned, held_out, seq_len=seq_len, limit=8).ppl
run = distill(tuned, lm, train_tokens, DistillConfig(steps=3 if SMOKE else 100, batch_size=8, seq_len=seq_len,
                                                     lr=1e-3), progress=not SMOKE)
after = pb.perplexity(tuned, held_out, seq_len=seq_len, limit=8).ppl
print(f"held-out perplexity at size {size}: {before:.2f} as cut, {after:.2f} after {run.steps} steps "
      f"({run.train_tokens:,} tokens) of distillation; full LM "
      f"{pb.perplexity(lm, held_out, seq_len=seq_len, limit=8).ppl:.2f}")

# %% [markdown]
# ## 5. Compiled, and timed
#
# A static-KV-cache decoder runs the fixed-shape decode step under `torch.compile`. On a
# CPU the numbers below only show that it runs; the benchmarks page holds the measured
# speed-ups (GPU, bf16). In smoke mode the graph is only traced (`backend="eager"`), which
# checks that it captures whole without paying for code generation.

# %%
new_tokens = 8 if SMOKE else 128
max_len = prompt.shape[1] + new_tokens + 8
compile_options = dict(compile=True, compile_mode=None, compile_backend="eager" if SMOKE else "inductor")
timings = {}
for name, model in [("full", lm), (f"size {size}", loaded)]:
    decoder = Decoder(model, max_len=max_len, **compile_options)
    timings[name] = timed_generate(decoder, prompt, new_tokens, warmup=1)
    print(f"{name:>9}: {timings[name].decode_tokens_per_s:8.1f} decode tokens/s (batch 1, CPU)")
print("generated by the sub-network:", repr(tokenizer.decode(timings[f"size {size}"].tokens[0].tolist())))

# %% [markdown]
# ## 6. The sub-network as a speculative draft
#
# The draft proposes `k` tokens, the full LM checks them in one pass and keeps the longest
# prefix it agrees with. Greedy decoding with a draft gives exactly the full LM's greedy
# tokens; how many proposals are accepted measures how close the sub-network stays to it.

# %%
k = 4
speculation = speculative_generate(lm, loaded, prompt, new_tokens, k=k)
plain = Decoder(lm, max_len=max_len).generate(prompt, new_tokens)
print(f"acceptance rate {speculation.acceptance_rate:.2f}, {speculation.tokens_per_step:.2f} tokens per target pass")
print("identical to the full LM's greedy decoding:", torch.equal(speculation.tokens, plain.cpu()))
