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
# # 2. The gate posterior's uncertainty, with ArviZ
#
# The masks of notebook 1 come from the posterior *median* of the scales. Behind them is
# a whole posterior `q(log λ)`: for every draw of the scales and every size `s`, the
# budget equation gives `τ(s)` and the keep probabilities `π_l(s)` (layers) and
# `π_lu(s)` (units). `ppn_bayes.inspect.posterior` turns these draws into ArviZ data with named
# dimensions (`chain`, `draw`, `layer`, `unit`, `size`) and summarises them.
#
# Needs the fit written by `01_fit.py` under `$PPN_RUN_DIR/fit` (default
# `runs/notebooks/fit`).

# %%
import copy
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import ppn_bayes as pb
from ppn_bayes.inspect import posterior
from ppn_bayes.lm import load_tokenizer

SMOKE = os.environ.get("PPN_SMOKE") == "1"
RUN_DIR = Path(os.environ.get("PPN_RUN_DIR", "runs/notebooks"))
checkpoint = RUN_DIR / "fit"
if not (checkpoint / "state.json").is_file():
    raise FileNotFoundError(f"no fit at {checkpoint}: run 01_fit.py first (with the same PPN_RUN_DIR)")
fitted = pb.load_fit(checkpoint)
arch = fitted.arch
n_draws = 40 if SMOKE else 400
print(f"{arch.n_layers} layers x {arch.n_units} units; fitted for {fitted.result.steps_done} steps")

# %% [markdown]
# ## Draws at many sizes
#
# No Pyro tracing is needed: the guide's log-scales are drawn directly and the budget
# equation is solved by bisection for every draw and size at once.

# %%
sizes = np.round(np.arange(0.1, 1.0001, 0.05), 2)
draws = posterior.posterior_draws(fitted, sizes=sizes, n_draws=n_draws, seed=0)
idata = posterior.to_inference_data(draws)
idata.posterior

# %% [markdown]
# Every draw meets the budget exactly: the expected size equals the requested size.

# %%
print("largest |E[size | τ(s)] - s|:", float(np.abs(draws.expected_size - draws.sizes).max()))

# %% [markdown]
# ## Summary table
#
# ArviZ's summary: posterior mean, sd, highest-density interval, Monte Carlo standard
# errors and effective sample sizes (draws from `q` are independent, so the ESS is close
# to the number of draws; `r_hat` needs several chains and is left out).

# %%
posterior.summary(idata, var_names=["keep_layer", "tau"], sizes=[0.5], round_to=3)

# %% [markdown]
# ## Keep probability against size
#
# One panel per layer: the layer's `π_l` in black, attention units in blue, MLP units in
# orange; bands are 94% HDIs. Lowering the size lowers `τ`, and units collapse in the order
# of their scales `λ`.

# %%
fig = posterior.plot_keep_curves(idata, ncols=4)

# %% [markdown]
# ## Forest plot at one size, and the ambiguous units
#
# At a chosen size, a unit is *ambiguous* when its posterior keep probability lies
# between 0.1 and 0.9: the data have not decided whether to keep it. These are where a
# longer fit, more data or a different prior changes the mask.

# %%
size = 0.5
fig = posterior.plot_forest(idata, size=size, items="ambiguous")

# %%
ambiguous = posterior.ambiguous_units(idata, size=size)
print(f"{len(ambiguous)} ambiguous of {arch.n_layers * (1 + arch.n_units)} layers and units at size {size}")
ambiguous.head(10)

# %% [markdown]
# ## The masks over the fit
#
# Notebook 1's fit evaluated its deployed sub-networks as it went and kept their masks.
# `ppn_bayes.inspect.trajectory` reads them back per layer: how many attention and MLP
# units the sub-network of one size kept at each evaluation. A layer whose colour still
# changes at the last evaluations is where the ranking has not settled (a longer fit, or
# `settle_steps`, is what steadies it).

# %%
from ppn_bayes.inspect import trajectory

over_fit = trajectory.mask_trajectory(fitted.result.validation, arch, 0.3)
fig = trajectory.plot_mask_trajectory(over_fit)
print("(attention, MLP) units kept per layer at the last evaluation:", over_fit.kept())
print("layers that changed between the last two evaluations:", over_fit.changed_layers() or "none")

# %% [markdown]
# ## How the posterior changes with the prior's settings
#
# Three gate-only refits (`train_lm=False`) of the same fitted LM, from the same start:
#
# * the fitted settings;
# * a prior 100 times heavier (`prior_weight=100`): the KL to the half-Cauchy prior
#   pulls `q(log λ)` back towards the prior and widens it;
# * point estimates of the scales (`posterior="point"`): no uncertainty at all, every
#   keep probability is one number.
#
# The spread (posterior sd of `π_lu` at size 0.5, averaged over units) and the number of
# ambiguous units compare them. In smoke mode the refits are a few steps long and the
# differences are small.

# %%
TEXT = os.environ.get("PPN_TEXT")  # the training text of 01_fit.py, if it was not the embedded one
text = Path(TEXT).read_text(encoding="utf-8") if TEXT else pb.embedded_text()
text = text[: 20_000 if SMOKE else None]
tokenizer = load_tokenizer(checkpoint / "lm")
tokens = pb.tokenize(text, tokenizer)
settings = {
    "as fitted": {},
    "prior_weight=100": {"prior_weight": 100.0},
    "posterior='point'": {"posterior": "point"},
}
rows = []
for name, changes in settings.items():
    config = fitted.config.replace(train_lm=False, steps=1 if SMOKE else 60, **changes)
    refit = pb.fit(copy.deepcopy(fitted.lm), tokens, config, progress=False)
    refit_draws = posterior.posterior_draws(refit, sizes=[size], n_draws=n_draws, seed=0)
    rows.append({
        "setting": name,
        "sd of keep_unit": float(refit_draws.keep_unit.std(axis=0).mean()),
        "ambiguous": len(posterior.ambiguous_units(refit_draws, size=size)),
    })
for row in rows:
    print(f"{row['setting']:>18}: mean sd of π_lu at size {size} = {row['sd of keep_unit']:.4f}, "
          f"{row['ambiguous']} ambiguous")

# %%
fig, ax = plt.subplots(figsize=(5, 2.5))
ax.barh([row["setting"] for row in rows], [row["sd of keep_unit"] for row in rows])
ax.set_xlabel(f"posterior sd of π_lu at size {size} (mean over units)")
fig.tight_layout()

# %% [markdown]
# The same tables and plots come from the command line:
#
# ```
# ppn-bayes summarize runs/notebooks/fit --out runs/notebooks/summary --size 0.5
# ```
#
# Next: `03_deploy.py` exports the masks and builds the sub-network.
