"""Masks over a fit: what the deployed sub-network of one size kept at each evaluation.

A fit with held-out evaluations (``FitConfig.eval_sizes``, ``ppn-bayes fit --eval-sizes``)
keeps, for every evaluation and size, the deployed masks as a string of 0 and 1 (``kept``:
``Masks.marks``, read back by ``core.ranking.flat_from_marks``). This module
reads them back per layer: how many attention and MLP units of each layer the size kept at
each step, and where the ranking still moved. No ArviZ: it reads JSON rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.ranking import flat_from_marks
from ..io import atomic_file


@dataclass(frozen=True)
class MaskTrajectory:
    """The deployed masks of one size at each evaluation of a fit.

    ``E`` evaluations, ``L`` layers.

    Attributes
    ----------
    size : float
        The size evaluated.
    steps : numpy.ndarray
        ``[E]`` the steps of the evaluations.
    nll : numpy.ndarray
        ``[E]`` held-out mean next-token NLL of the deployed sub-network.
    layer : numpy.ndarray
        ``[E, L]`` bool, the layers kept.
    attention : numpy.ndarray
        ``[E, L]`` attention units kept per layer (0 in a dropped layer).
    mlp : numpy.ndarray
        ``[E, L]`` MLP units kept per layer (0 in a dropped layer).
    n_attention_units, n_mlp_units : int
        Units a layer has of each kind.
    """

    size: float
    steps: np.ndarray
    nll: np.ndarray
    layer: np.ndarray
    attention: np.ndarray
    mlp: np.ndarray
    n_attention_units: int
    n_mlp_units: int

    def kept(self, evaluation: int = -1) -> list[tuple[int, int]]:
        """``(attention, MLP)`` units kept in each layer at one evaluation (default: the last)."""
        return [(int(a), int(m)) for a, m in zip(self.attention[evaluation], self.mlp[evaluation])]

    def changed_layers(self, first: int = -2, second: int = -1) -> list[int]:
        """The layers whose kept counts differ between two evaluations (default: the last two)."""
        differ = ((self.layer[first] != self.layer[second]) | (self.attention[first] != self.attention[second])
                  | (self.mlp[first] != self.mlp[second]))
        return [int(i) for i in np.flatnonzero(differ)]

    def to_dict(self) -> dict:
        """JSON-ready: the size, steps, NLLs and per-layer counts."""
        return {"size": self.size, "steps": self.steps.tolist(), "nll": self.nll.tolist(),
                "layer": self.layer.astype(int).tolist(), "attention": self.attention.tolist(),
                "mlp": self.mlp.tolist(), "n_attention_units": self.n_attention_units,
                "n_mlp_units": self.n_mlp_units}


def read_validation(path) -> list[dict]:
    """The evaluation rows of a fit's ``validation.jsonl`` (one JSON object a line).

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When a line is not a JSON object with ``step`` and ``sizes`` (named by line number).
    """
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or "step" not in row or not isinstance(row.get("sizes"), list):
            raise ValueError(f"{path}, line {number}: not an evaluation row (needs 'step' and a list 'sizes')")
        rows.append(row)
    return rows


def evaluated_sizes(validation: list[dict]) -> list[float]:
    """The sizes whose masks every evaluation row keeps (``kept``), descending."""
    sets = [{float(s["size"]) for s in row["sizes"] if "kept" in s} for row in validation]
    return sorted(set.intersection(*sets), reverse=True) if sets else []


def mask_trajectory(validation: list[dict], arch, size: float) -> MaskTrajectory:
    """The deployed masks of ``size`` at each evaluation of ``validation``, per layer.

    Parameters
    ----------
    validation : list of dict
        A fit's evaluation rows (``PuppetFit.result.validation``, or :func:`read_validation`
        of its ``validation.jsonl``), in step order.
    arch : Architecture
        The LM's prunable structure; only ``n_layers``, ``n_attention_units`` and
        ``n_mlp_units`` are read.
    size : float
        One of the fit's evaluated sizes.

    Raises
    ------
    ValueError
        When there are no rows, when ``size`` was not evaluated with its masks in every row
        (the sizes that were are named), or when a row's masks do not have the length ``arch``
        gives (``L + L·U``).
    """
    if not validation:
        raise ValueError("no evaluation rows: the fit ran without eval_sizes, or before its first evaluation")
    L, A, M = arch.n_layers, arch.n_attention_units, arch.n_mlp_units
    want = L + L * (A + M)
    steps, nll, flat = [], [], []
    for row in validation:
        match = [s for s in row["sizes"] if abs(float(s["size"]) - size) < 1e-9 and "kept" in s]
        if not match:
            have = ", ".join(f"{s:g}" for s in evaluated_sizes(validation)) or "none"
            raise ValueError(f"size {size:g} has no masks at step {row['step']}; sizes with masks at every "
                             f"evaluation: {have}")
        kept = match[0]["kept"]
        if len(kept) != want or set(kept) - {"0", "1"}:
            raise ValueError(f"step {row['step']}: the masks hold {len(kept)} marks, not the {want} of "
                             f"{L} layers × (1 + {A} attention + {M} MLP units)")
        steps.append(int(row["step"]))
        nll.append(float(match[0]["nll"]))
        flat.append(flat_from_marks(kept).numpy())
    flat = np.stack(flat)  # [E, L + L·U]
    layer = flat[:, :L]
    unit = flat[:, L:].reshape(len(flat), L, A + M) & layer[:, :, None]
    return MaskTrajectory(size=float(size), steps=np.asarray(steps), nll=np.asarray(nll), layer=layer,
                          attention=unit[:, :, :A].sum(-1), mlp=unit[:, :, A:].sum(-1), n_attention_units=A,
                          n_mlp_units=M)


def plot_mask_trajectory(trajectory: MaskTrajectory, *, path=None, dpi: int = 120):
    """Held-out perplexity of the deployed sub-network against the step (top), and the share
    of each layer's attention and MLP units it kept at each evaluation (heatmaps, layers down,
    evaluations across; a dropped layer is grey). A layer whose colour changes late is where
    the ranking still moved. Returns the figure; writes a PNG to ``path`` when given."""
    import matplotlib.pyplot as plt

    t = trajectory
    E, L = t.layer.shape
    heat_height = max(2.0, 0.16 * L)
    fig = plt.figure(figsize=(9, 2.6 + heat_height), constrained_layout=True)
    grid = fig.add_gridspec(2, 2, height_ratios=[2.0, heat_height])
    top = fig.add_subplot(grid[0, :])
    top.plot(t.steps, np.exp(t.nll), marker="o")
    top.set_xlabel("step")
    top.set_ylabel("held-out perplexity")
    top.set_title(f"size {t.size:g}: the deployed sub-network at each evaluation")
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.8")
    image = None
    every = max(1, L // 16)  # layer ticks: all of them up to 16 layers
    for column, (name, counts, total) in enumerate((("attention units", t.attention, t.n_attention_units),
                                                     ("MLP units", t.mlp, t.n_mlp_units))):
        ax = fig.add_subplot(grid[1, column])
        share = np.ma.masked_where(~t.layer.T, counts.T / max(1, total))  # [L, E]
        image = ax.imshow(share, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name} kept, of {total} (grey: layer dropped)", fontsize=10)
        ax.set_xticks(range(E), [str(s) for s in t.steps], rotation=90, fontsize=7)
        ax.set_yticks(range(0, L, every))
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=fig.axes[1:], shrink=0.9, label="share kept")
    if path is not None:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    return fig
