"""The gate posterior in ArviZ: draws at any size, summaries, keep curves, forest plots.

Draws come straight from the guide ``q(log λ)`` (no Pyro tracing): for each draw of the
log-scales and each requested size ``s`` the budget equation gives ``log τ(s)``, and with
it the keep probabilities

    π_l(s)  = σ(2·(log τ + log λ_l))                         (``keep_layer``)
    π_lu(s) = π_l(s) · σ(2·(log τ + log λ_l + log λ_lu))     (``keep_unit``)

Every variable carries named dimensions:

| variable | dims | meaning |
|---|---|---|
| `lambda_layer` | `chain, draw, layer` | λ_l, natural scale (not log) |
| `lambda_unit` | `chain, draw, layer, unit` | λ_lu, natural scale (not log) |
| `tau` | `chain, draw, size` | τ(s), natural scale |
| `keep_layer` | `chain, draw, size, layer` | π_l(s) |
| `keep_unit` | `chain, draw, size, layer, unit` | π_lu(s) |
| `expected_size` | `chain, draw, size` | E[size ∣ τ(s)], equal to `s` |

``chain`` has length 1 (draws from ``q`` are independent); ``unit`` is labelled
``attn0, attn1, ..., mlp0, mlp1, ...``; ``size`` holds the requested sizes. Without the
hierarchy (``hierarchy=False``) there is no ``lambda_layer`` variable. The
``constant_data`` group holds the parameter costs ``layer_cost [layer]`` and ``unit_cost
[layer, unit]``.

All ArviZ use of ppn_bayes lives in this module. It works with both ArviZ generations,
which ``pip install "ppn-bayes[arviz]"`` picks by Python: ArviZ 0.2x (``InferenceData``)
on Python 3.11, ArviZ 1.x (``xarray.DataTree``) on Python >= 3.12. Both give the same
files and tables: the same groups, variables and attributes in ``posterior.nc`` (netCDF
through h5netcdf), the same columns in :func:`summary` (ArviZ 0.x's names, ``hdi_3%``
and ``hdi_97%`` for a 94% HDI), and plots drawn with matplotlib from the same intervals.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.architecture import Architecture
from ..core.budget import expected_size, keep_probs, solve_log_tau
from ..io import atomic_directory, atomic_file
from ..core.model import FLAT_LOG_LAMBDA

__all__ = [
    "DEFAULT_SIZES",
    "PosteriorDraws",
    "SUMMARY_COLUMNS",
    "ambiguous_units",
    "check_sizes",
    "plot_forest",
    "plot_keep_curves",
    "posterior_draws",
    "summary",
    "to_inference_data",
    "unit_labels",
    "write_summary",
]

#: Sizes drawn when none are given: 0.1, 0.15, ..., 1.0.
DEFAULT_SIZES: tuple[float, ...] = tuple(round(0.1 + 0.05 * i, 2) for i in range(19))


#: Columns of :func:`summary` (and of ``summary.csv``) for ``hdi_prob=0.94``, in order; the
#: HDI columns are named after their tail probabilities, as ArviZ 0.x names them.
SUMMARY_COLUMNS: tuple[str, ...] = ("mean", "sd", "hdi_3%", "hdi_97%", "mcse_mean", "mcse_sd", "ess_bulk",
                                    "ess_tail")

_INSTALL_HINT = 'install the extra: pip install "ppn-bayes[arviz]"'


def _arviz():
    """ArviZ and its major version (0 for the 0.x series, 1 for 1.x)."""
    import warnings

    with warnings.catch_warnings():
        # ArviZ 0.23 announces its 1.0 refactor with a FutureWarning on import.
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            import arviz as az
        except ImportError as err:
            raise ImportError(f"ppn_bayes.inspect.posterior needs ArviZ ({err}); {_INSTALL_HINT}") from err
    return az, int(az.__version__.split(".")[0])


def _require_netcdf() -> None:
    """Refuse early when h5netcdf (the netCDF engine of ``posterior.nc``) or its h5py backend is missing."""
    try:
        import h5netcdf  # noqa: F401
        import h5py  # noqa: F401
    except ImportError as err:
        raise ImportError(f"writing posterior.nc needs h5netcdf and h5py ({err}); {_INSTALL_HINT}") from err


def _hdi_columns(hdi_prob: float) -> tuple[str, str]:
    """Names of the HDI columns as ArviZ 0.x writes them: ``hdi_3%``, ``hdi_97%`` at 0.94."""
    alpha = 1 - hdi_prob
    return f"hdi_{100 * alpha / 2:g}%", f"hdi_{100 * (1 - alpha / 2):g}%"


@contextlib.contextmanager
def _arviz_quiet():
    """Silence ArviZ's single-chain messages while computing diagnostics.

    Draws from the guide form one chain, so the between-chain diagnostic ``r_hat`` is
    undefined and ArviZ logs a shape warning for it; a keep probability that is exactly 1
    in every draw (size 1) has no variance, which numpy warns about. Both are hidden here.
    """
    import warnings

    az, _ = _arviz()
    logger = getattr(az, "_log", None) or logging.getLogger("arviz")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"arviz\..*")
            warnings.filterwarnings("ignore", category=UserWarning, module=r"arviz\..*")
            yield
    finally:
        logger.setLevel(level)


def unit_labels(arch: Architecture) -> list[str]:
    """Labels of the unit axis: ``attn0 .. attn{A-1}`` then ``mlp0 .. mlp{M-1}``.

    Parameters
    ----------
    arch : Architecture
        The prunable structure of the LM.

    Returns
    -------
    list of str
        One label per unit, in the order of every per-unit tensor.
    """
    return [f"attn{i}" for i in range(arch.n_attention_units)] + [f"mlp{j}" for j in range(arch.n_mlp_units)]


# -- draws -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PosteriorDraws:
    """Posterior draws of the scales and of the keep probabilities at several sizes.

    Arrays are numpy ``float64``; ``D`` draws, ``S`` sizes, ``L`` layers, ``U`` units.

    Attributes
    ----------
    arch : Architecture
        The prunable structure the draws belong to.
    sizes : numpy.ndarray
        ``[S]`` sizes, ascending.
    log_lambda_layer : numpy.ndarray
        ``[D, L]`` draws of ``log λ_l`` (constant 30 without the hierarchy).
    log_lambda_unit : numpy.ndarray
        ``[D, L, U]`` draws of ``log λ_lu`` as the budget equation reads them (shifted by
        -30 without the hierarchy: ``PuppetGuide.effective``).
    log_tau : numpy.ndarray
        ``[D, S]`` root of the budget equation for each draw and size.
    keep_layer : numpy.ndarray
        ``[D, S, L]`` keep probabilities ``π_l``.
    keep_unit : numpy.ndarray
        ``[D, S, L, U]`` keep probabilities ``π_lu``.
    expected_size : numpy.ndarray
        ``[D, S]`` expected size reached (equal to the size up to bisection precision).
    hierarchy : bool
        Whether the guide has layer scales (``lambda_layer``).
    posterior : str
        The guide's family: ``'normal'`` or ``'point'``.
    """

    arch: Architecture
    sizes: np.ndarray
    log_lambda_layer: np.ndarray
    log_lambda_unit: np.ndarray
    log_tau: np.ndarray
    keep_layer: np.ndarray
    keep_unit: np.ndarray
    expected_size: np.ndarray
    hierarchy: bool = True
    posterior: str = "normal"

    @property
    def n_draws(self) -> int:
        """Number of draws ``D``."""
        return self.log_tau.shape[0]


def check_sizes(sizes) -> np.ndarray:
    """Sizes as a sorted, deduplicated ``float64`` array, each checked to lie in ``(0, 1]``.

    Parameters
    ----------
    sizes : float or sequence of float
        Kept fractions of the decoder's parameters.

    Returns
    -------
    numpy.ndarray
        ``[S]`` ascending sizes.

    Raises
    ------
    ValueError
        When no size is given or one lies outside ``(0, 1]``.
    """
    values = np.asarray(list(sizes) if not np.isscalar(sizes) else [sizes], dtype=np.float64)
    if values.size == 0:
        raise ValueError("sizes is empty: give at least one size in (0, 1]")
    bad = values[~((values > 0) & (values <= 1))]
    if bad.size:
        raise ValueError(f"sizes must lie in (0, 1], got {bad.tolist()}")
    return np.unique(values)


def _guide_of(fit_or_guide):
    guide = getattr(fit_or_guide, "guide", fit_or_guide)
    if not hasattr(guide, "sample_log_lambda") or not hasattr(guide, "arch"):
        raise TypeError(
            f"expected a PuppetFit or a PuppetGuide, got {type(fit_or_guide).__name__}"
        )
    return guide


def posterior_draws(fit_or_guide, *, sizes=DEFAULT_SIZES, n_draws: int = 200, seed: int = 0) -> PosteriorDraws:
    """Draw the scales from the guide and solve the budget equation at every size.

    Parameters
    ----------
    fit_or_guide : PuppetFit or PuppetGuide
        A fitted network (``ppn_bayes.fit``) or its guide ``q(log λ)``.
    sizes : sequence of float, default DEFAULT_SIZES
        Sizes in ``(0, 1]`` (kept fraction of decoder parameters); sorted and deduplicated.
    n_draws : int, default 200
        Draws of ``(log λ_l, log λ_lu)`` from ``q``; at least 4 (ArviZ's diagnostics).
    seed : int, default 0
        Seed of the draws.

    Returns
    -------
    PosteriorDraws
        Draws of the scales, ``log τ``, keep probabilities and expected sizes.

    Raises
    ------
    ValueError
        When a size lies outside ``(0, 1]`` or ``n_draws < 4``.
    """
    guide = _guide_of(fit_or_guide)
    sizes = check_sizes(sizes)
    if int(n_draws) < 4:
        raise ValueError(f"n_draws must be at least 4, got {n_draws}")
    n_draws = int(n_draws)
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        ll, lu = guide.sample_log_lambda(n_draws, generator=generator)
        ll, lu = ll.detach().cpu().double(), lu.detach().cpu().double()  # [D, L], [D, L, U]
        D, S = n_draws, sizes.size
        layer_cost, unit_cost = guide.arch.costs()  # [L], [L, U]
        ll_s = ll[:, None, :].expand(D, S, -1)  # [D, S, L]
        lu_s = lu[:, None, :, :].expand(D, S, -1, -1)  # [D, S, L, U]
        target = torch.as_tensor(sizes).expand(D, S)  # [D, S]
        log_tau = solve_log_tau(target, ll_s, lu_s, layer_cost, unit_cost)  # [D, S]
        keep_layer, keep_unit = keep_probs(log_tau, ll_s, lu_s)  # [D, S, L], [D, S, L, U]
        reached = expected_size(log_tau, ll_s, lu_s, layer_cost, unit_cost)  # [D, S]
    return PosteriorDraws(
        arch=guide.arch,
        sizes=sizes,
        log_lambda_layer=ll.numpy(),
        log_lambda_unit=lu.numpy(),
        log_tau=log_tau.numpy(),
        keep_layer=keep_layer.numpy(),
        keep_unit=keep_unit.numpy(),
        expected_size=reached.numpy(),
        hierarchy=bool(getattr(guide, "hierarchy", True)),
        posterior=str(getattr(guide, "posterior", "normal")),
    )


def _is_fit_or_guide(data) -> bool:
    return hasattr(data, "sample_log_lambda") or hasattr(getattr(data, "guide", None), "sample_log_lambda")


def _as_draws(data, **draw_options) -> PosteriorDraws | None:
    """``data`` as :class:`PosteriorDraws` when it is draws, a fit or a guide; else None."""
    if isinstance(data, PosteriorDraws):
        return data
    if _is_fit_or_guide(data):
        return posterior_draws(data, **draw_options)
    return None


def _draws_at(data, size: float):
    """``data`` itself, or draws at ``size`` when ``data`` is a fit or a guide."""
    return posterior_draws(data, sizes=[size]) if _is_fit_or_guide(data) else data


def to_inference_data(data, *, sizes=DEFAULT_SIZES, n_draws: int = 200, seed: int = 0):
    """Convert posterior draws to ``arviz.InferenceData`` with named dimensions.

    Parameters
    ----------
    data : PosteriorDraws, PuppetFit or PuppetGuide
        Draws, or a fit/guide to draw from (then ``sizes``, ``n_draws`` and ``seed`` apply).
    sizes : sequence of float, default DEFAULT_SIZES
        Sizes to draw at when ``data`` is a fit or a guide.
    n_draws : int, default 200
        Draws when ``data`` is a fit or a guide.
    seed : int, default 0
        Seed when ``data`` is a fit or a guide.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        Group ``posterior`` with ``lambda_layer``, ``lambda_unit``, ``tau``, ``keep_layer``,
        ``keep_unit``, ``expected_size`` (dims ``chain``, ``draw``, ``layer``, ``unit``,
        ``size``), group ``constant_data`` with ``layer_cost`` and ``unit_cost``; the
        attributes (``inference_library="ppn_bayes"``, ``model_type``, ``guide_posterior``,
        ``hierarchy``, ``lambda_scale``) on the root and on both groups. An
        ``InferenceData`` under ArviZ 0.x, an ``xarray.DataTree`` under ArviZ 1.x; both
        are read the same way (``idata.posterior["keep_unit"]``, ``idata["posterior"]``).
    """
    draws = _as_draws(data, sizes=sizes, n_draws=n_draws, seed=seed)
    if draws is None:
        raise TypeError(f"expected PosteriorDraws, a PuppetFit or a PuppetGuide, got {type(data).__name__}")
    az, major = _arviz()
    arch = draws.arch
    posterior = {
        # Without the hierarchy the budget reads log λ_lu - 30 (PuppetGuide.effective): undo it.
        "lambda_unit": np.exp(draws.log_lambda_unit + (0.0 if draws.hierarchy else FLAT_LOG_LAMBDA))[None],
        "tau": np.exp(draws.log_tau)[None],  # [1, D, S]
        "keep_layer": draws.keep_layer[None],  # [1, D, S, L]
        "keep_unit": draws.keep_unit[None],  # [1, D, S, L, U]
        "expected_size": draws.expected_size[None],  # [1, D, S]
    }
    if draws.hierarchy:
        posterior = {"lambda_layer": np.exp(draws.log_lambda_layer)[None], **posterior}  # [1, D, L]
    layer_cost, unit_cost = arch.costs()
    constant = {"layer_cost": layer_cost.numpy().astype(np.int64), "unit_cost": unit_cost.numpy().astype(np.int64)}
    dims = {
        "lambda_layer": ["layer"],
        "lambda_unit": ["layer", "unit"],
        "tau": ["size"],
        "keep_layer": ["size", "layer"],
        "keep_unit": ["size", "layer", "unit"],
        "expected_size": ["size"],
        "layer_cost": ["layer"],
        "unit_cost": ["layer", "unit"],
    }
    coords = {"layer": np.arange(arch.n_layers), "unit": unit_labels(arch), "size": draws.sizes}
    attrs = {
        "inference_library": "ppn_bayes",
        "model_type": arch.model_type,
        "guide_posterior": draws.posterior,
        "hierarchy": int(draws.hierarchy),
        "lambda_scale": "natural (not log)",
    }
    with _arviz_quiet():
        if major >= 1:  # ArviZ 1.x: groups in one mapping, attributes per group ("/" the root)
            return az.from_dict({"posterior": posterior, "constant_data": constant}, coords=coords, dims=dims,
                                attrs={group: dict(attrs) for group in ("/", "posterior", "constant_data")})
        # ArviZ 0.x puts ``attrs`` on the root and on constant_data, ``posterior_attrs`` on posterior.
        return az.from_dict(posterior=posterior, constant_data=constant, coords=coords, dims=dims,
                            attrs=dict(attrs), posterior_attrs=dict(attrs))


# -- reading keep probabilities back ---------------------------------------------------------
@dataclass(frozen=True)
class _Keep:
    sizes: np.ndarray  # [S]
    layers: np.ndarray  # [L]
    units: list[str]  # [U]
    layer: np.ndarray  # [N, S, L]
    unit: np.ndarray  # [N, S, L, U]


def _keep(data) -> _Keep:
    """Keep probabilities of layers and units, draws flattened over chains."""
    draws = _as_draws(data)
    if draws is not None:
        return _Keep(draws.sizes, np.arange(draws.arch.n_layers), unit_labels(draws.arch),
                     draws.keep_layer, draws.keep_unit)
    try:
        post = data["posterior"]
        layer = post["keep_layer"].transpose("chain", "draw", "size", "layer")
        unit = post["keep_unit"].transpose("chain", "draw", "size", "layer", "unit")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise TypeError(
            "expected PosteriorDraws, a PuppetFit, a PuppetGuide or InferenceData from "
            f"to_inference_data ({err})"
        ) from None
    n = layer.shape[0] * layer.shape[1]
    return _Keep(
        sizes=np.asarray(post["size"].values, dtype=np.float64),
        layers=np.asarray(post["layer"].values),
        units=[str(u) for u in post["unit"].values],
        layer=np.asarray(layer.values).reshape(n, *layer.shape[2:]),
        unit=np.asarray(unit.values).reshape(n, *unit.shape[2:]),
    )


def _size_index(sizes: np.ndarray, size: float) -> int:
    matches = np.flatnonzero(np.isclose(sizes, float(size), rtol=0, atol=1e-9))
    if matches.size == 0:
        raise ValueError(
            f"size {size} was not drawn; drawn sizes: {[round(float(s), 6) for s in sizes]}. "
            "Include it in sizes= when drawing."
        )
    return int(matches[0])


def _hdi(samples: np.ndarray, prob: float) -> tuple[np.ndarray, np.ndarray]:
    """Highest-density interval along axis 0: the shortest interval holding ``prob``.

    Same definition as ``arviz.hdi`` for unimodal samples; kept here so the curves do not
    depend on ArviZ's changing return types.
    """
    if not 0 < prob < 1:
        raise ValueError(f"hdi_prob must lie in (0, 1), got {prob}")
    ordered = np.sort(samples, axis=0)  # [N, ...]
    n = ordered.shape[0]
    width = int(np.floor(prob * n))
    if width < 1 or width >= n:
        return ordered[0], ordered[-1]
    gaps = ordered[width:] - ordered[: n - width]  # [N - width, ...]
    start = np.argmin(gaps, axis=0)[None]  # [1, ...]
    low = np.take_along_axis(ordered, start, axis=0)[0]
    high = np.take_along_axis(ordered, start + width, axis=0)[0]
    return low, high


# -- tables ----------------------------------------------------------------------------------
def summary(data, *, var_names=None, sizes=None, hdi_prob: float = 0.94, round_to: int | None = None):
    """ArviZ summary table: mean, sd, HDI, MCSE and effective sample sizes.

    Parameters
    ----------
    data : InferenceData, PosteriorDraws, PuppetFit or PuppetGuide
        What :func:`to_inference_data` accepts, or its result.
    var_names : list of str, optional
        Variables to summarise (default: all of the ``posterior`` group).
    sizes : sequence of float, optional
        Restrict the size-dependent rows to these drawn sizes (default: all).
    hdi_prob : float, default 0.94
        Probability mass of the highest-density interval.
    round_to : int, optional
        Digits to round to (default: no rounding).

    Returns
    -------
    pandas.DataFrame
        One row per variable and coordinate (``keep_unit[0.5, 3, mlp2]``), columns
        ``mean, sd, hdi_*%, hdi_*%, mcse_mean, mcse_sd, ess_bulk, ess_tail`` in this order
        (:data:`SUMMARY_COLUMNS` at ``hdi_prob=0.94``) under either ArviZ generation: ArviZ
        1.x's ``hdi94_lb, hdi94_ub`` are renamed to ArviZ 0.x's ``hdi_3%, hdi_97%``.
        ``r_hat`` is left out: draws from the guide form one chain.
    """
    import pandas as pd

    az, major = _arviz()
    if not 0 < hdi_prob < 1:
        raise ValueError(f"hdi_prob must lie in (0, 1), got {hdi_prob}")
    idata = to_inference_data(data) if isinstance(data, PosteriorDraws) or _is_fit_or_guide(data) else data
    coords = None
    if sizes is not None:
        drawn = np.asarray(idata["posterior"]["size"].values, dtype=np.float64)
        coords = {"size": [drawn[_size_index(drawn, s)] for s in check_sizes(sizes)]}
    rounding = round_to if round_to is not None else "none"
    low, high = _hdi_columns(hdi_prob)
    with _arviz_quiet():
        if major >= 1:  # ArviZ 1.x: the HDI columns are named hdi{percent}_lb and hdi{percent}_ub
            # Its summary takes the tail ESS at the quantiles of rcParams["stats.ci_prob"] (0.89
            # by default); 0.95 gives the 5% and 95% quantiles, ArviZ 0.x's tail ESS.
            with az.rc_context({"stats.ci_prob": 0.95}):
                table = az.summary(idata, var_names=var_names, coords=coords, ci_prob=hdi_prob, ci_kind="hdi",
                                   round_to=rounding)
            table = table.rename(columns={c: low if c.endswith("_lb") else high for c in table.columns
                                          if c.startswith("hdi") and c.endswith(("_lb", "_ub"))})
        else:
            table = az.summary(idata, var_names=var_names, coords=coords, hdi_prob=hdi_prob, round_to=rounding)
    columns = [*SUMMARY_COLUMNS[:2], low, high, *SUMMARY_COLUMNS[4:]]
    return pd.DataFrame(table[columns])


def ambiguous_units(data, *, size: float, low: float = 0.1, high: float = 0.9, hdi_prob: float = 0.94):
    """Layers and units whose posterior keep probability at ``size`` lies in ``(low, high)``.

    The posterior keep probability is the mean of ``π`` over draws.

    Parameters
    ----------
    data : InferenceData, PosteriorDraws, PuppetFit or PuppetGuide
        Draws that include ``size``, or a fit/guide (then drawn at ``size`` only).
    size : float
        The size of interest; must be one of the drawn sizes.
    low : float, default 0.1
        Lower bound of the ambiguous band, ``0 <= low < high``.
    high : float, default 0.9
        Upper bound of the ambiguous band, ``low < high <= 1``.
    hdi_prob : float, default 0.94
        Probability mass of the reported HDI.

    Returns
    -------
    pandas.DataFrame
        Columns ``layer`` (int), ``unit`` (label, ``"layer"`` for the layer itself),
        ``keep`` (posterior mean of ``π``), ``hdi_low``, ``hdi_high``; the most ambiguous
        (closest to ½) first.
    """
    import pandas as pd

    if not 0 <= low < high <= 1:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    keep = _keep(_draws_at(data, size))
    s = _size_index(keep.sizes, size)
    rows = []
    layer_low, layer_high = _hdi(keep.layer[:, s], hdi_prob)  # [L]
    unit_low, unit_high = _hdi(keep.unit[:, s], hdi_prob)  # [L, U]
    layer_mean, unit_mean = keep.layer[:, s].mean(0), keep.unit[:, s].mean(0)
    for i, layer in enumerate(keep.layers):
        if low < layer_mean[i] < high:
            rows.append((int(layer), "layer", layer_mean[i], layer_low[i], layer_high[i]))
        for j, unit in enumerate(keep.units):
            if low < unit_mean[i, j] < high:
                rows.append((int(layer), unit, unit_mean[i, j], unit_low[i, j], unit_high[i, j]))
    table = pd.DataFrame(rows, columns=["layer", "unit", "keep", "hdi_low", "hdi_high"])
    order = np.argsort(np.abs(table["keep"].to_numpy() - 0.5), kind="stable")
    return table.iloc[order].reset_index(drop=True)


# -- plots -----------------------------------------------------------------------------------
def _save_png(fig, path, dpi: int) -> None:
    """Write ``fig`` to ``path`` as PNG through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def plot_keep_curves(data, *, layers=None, units: bool = True, hdi_prob: float = 0.94, ncols: int = 5,
                     path=None, dpi: int = 110):
    """Keep probability against size, one panel per layer, with HDI bands.

    The layer's ``π_l`` is drawn in black; attention units (``attn*``) in blue, MLP units
    (``mlp*``) in orange, each with its posterior mean and a faint HDI band.

    Parameters
    ----------
    data : InferenceData, PosteriorDraws, PuppetFit or PuppetGuide
        Draws at several sizes, or a fit/guide to draw from at the default sizes.
    layers : sequence of int, optional
        Layers to show (default: all).
    units : bool, default True
        Also draw the units' curves, not only the layers'.
    hdi_prob : float, default 0.94
        Probability mass of the bands.
    ncols : int, default 5
        Panels per row.
    path : str or Path, optional
        When given, the figure is written there as PNG (atomically).
    dpi : int, default 110
        Resolution of the PNG.

    Returns
    -------
    matplotlib.figure.Figure
        The figure.
    """
    import matplotlib.pyplot as plt

    keep = _keep(data)
    chosen = list(range(len(keep.layers))) if layers is None else [int(np.flatnonzero(keep.layers == l)[0])
                                                                    for l in _existing(keep.layers, layers)]
    ncols = max(1, min(int(ncols), len(chosen)))
    nrows = -(-len(chosen) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 0.6 + 2.2 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    x = keep.sizes
    for ax in axes.flat[len(chosen):]:
        ax.set_visible(False)
    for ax, i in zip(axes.flat, chosen):
        if units:
            for j, label in enumerate(keep.units):
                color = "tab:blue" if label.startswith("attn") else "tab:orange"
                samples = keep.unit[:, :, i, j]  # [N, S]
                lo, hi = _hdi(samples, hdi_prob)
                ax.fill_between(x, lo, hi, color=color, alpha=0.06, lw=0)
                ax.plot(x, samples.mean(0), color=color, lw=0.8, alpha=0.7)
        samples = keep.layer[:, :, i]  # [N, S]
        lo, hi = _hdi(samples, hdi_prob)
        ax.fill_between(x, lo, hi, color="black", alpha=0.15, lw=0)
        ax.plot(x, samples.mean(0), color="black", lw=1.6)
        ax.set_title(f"layer {keep.layers[i]}", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("size")
    for ax in axes[:, 0]:
        ax.set_ylabel("keep probability")
    handles = [plt.Line2D([], [], color="black", lw=1.6, label="layer π_l")]
    if units:
        handles += [plt.Line2D([], [], color="tab:blue", label="attention π_lu"),
                    plt.Line2D([], [], color="tab:orange", label="MLP π_lu")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8)
    fig.suptitle(f"keep probability against size (mean, {hdi_prob:.0%} HDI)", fontsize=10)
    fig.tight_layout(rect=(0, 0.4 / fig.get_figheight(), 1, 1 - 0.35 / fig.get_figheight()))
    if path is not None:
        _save_png(fig, path, dpi)
    return fig


def _existing(values: np.ndarray, wanted) -> list:
    missing = [w for w in wanted if w not in set(values.tolist())]
    if missing:
        raise ValueError(f"unknown layers {missing}; the LM has layers 0..{len(values) - 1}")
    return list(wanted)


def plot_forest(data, *, size: float, items="ambiguous", low: float = 0.1, high: float = 0.9,
                max_units: int = 60, hdi_prob: float = 0.94, path=None, dpi: int = 110):
    """Forest plot of keep probabilities at one size, in ArviZ's style.

    Each row shows the posterior mean (circle), the interquartile range (thick line) and
    the HDI (thin line), first item at the top. It is drawn with matplotlib from
    :func:`_hdi` (the HDI ArviZ computes), so the figure is the same under ArviZ 0.x and
    1.x, whose forest plots differ in layout and API.

    Parameters
    ----------
    data : InferenceData, PosteriorDraws, PuppetFit or PuppetGuide
        Draws that include ``size``, or a fit/guide (then drawn at ``size`` only).
    size : float
        The size; must be one of the drawn sizes.
    items : {"ambiguous", "layers", "all"} or list of (int, str), default "ambiguous"
        Rows to show: ``"layers"`` every layer's ``π_l``; ``"ambiguous"`` every layer plus
        the units whose keep probability lies in ``(low, high)``; ``"all"`` every layer
        and unit; or explicit ``(layer, unit_label)`` pairs, ``unit_label="layer"`` for a
        layer itself.
    low : float, default 0.1
        Lower bound of the ambiguous band, used when ``items="ambiguous"``.
    high : float, default 0.9
        Upper bound of the ambiguous band, used when ``items="ambiguous"``.
    max_units : int, default 60
        With ``items="ambiguous"`` or ``"all"``, show at most this many units: those whose
        keep probability is closest to ½ (the title says how many were left out).
    hdi_prob : float, default 0.94
        Probability mass of the intervals.
    path : str or Path, optional
        When given, the figure is written there as PNG (atomically).
    dpi : int, default 110
        Resolution of the PNG.

    Returns
    -------
    matplotlib.figure.Figure
        The figure.
    """
    import matplotlib.pyplot as plt

    keep = _keep(_draws_at(data, size))
    s = _size_index(keep.sizes, size)
    layer_index = {int(l): i for i, l in enumerate(keep.layers)}
    unit_index = {u: j for j, u in enumerate(keep.units)}
    if isinstance(items, str):
        if items not in ("ambiguous", "layers", "all"):
            raise ValueError(f"items must be 'ambiguous', 'layers', 'all' or a list of pairs, got {items!r}")
        mean_unit = keep.unit[:, s].mean(0)  # [L, U]
        chosen = [(i, j) for i in range(len(keep.layers)) for j in range(len(keep.units))
                  if items == "all" or (items == "ambiguous" and low < mean_unit[i, j] < high)]
        left_out = max(0, len(chosen) - int(max_units))
        if left_out:
            closest = sorted(chosen, key=lambda ij: abs(mean_unit[ij] - 0.5))[: int(max_units)]
            chosen = sorted(closest)
        pairs = []
        for i, layer in enumerate(keep.layers):
            pairs.append((int(layer), "layer"))
            pairs += [(int(layer), keep.units[j]) for i2, j in chosen if i2 == i]
    else:
        left_out = 0
        pairs = [(int(l), str(u)) for l, u in items]
        for l, u in pairs:
            if l not in layer_index or (u != "layer" and u not in unit_index):
                raise ValueError(f"unknown item ({l}, {u!r}): layers {sorted(layer_index)}, units {keep.units}")
    if not pairs:
        raise ValueError("no items to plot")
    columns = [keep.layer[:, s, layer_index[l]] if u == "layer" else keep.unit[:, s, layer_index[l], unit_index[u]]
               for l, u in pairs]
    samples = np.stack(columns, axis=-1)  # [N, K]
    labels = [f"layer {l}" if u == "layer" else f"{l}/{u}" for l, u in pairs]
    height = 1.2 + 0.22 * len(pairs)
    fig, ax = plt.subplots(figsize=(6, height))
    _draw_forest(ax, samples, labels, hdi_prob)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("keep probability")
    title = f"keep probability at size {keep.sizes[s]:g} (mean, {hdi_prob:.0%} HDI)"
    if left_out:
        title += f"\n{left_out} more units not shown (max_units={max_units})"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        _save_png(fig, path, dpi)
    return fig


def _draw_forest(ax, samples: np.ndarray, labels: list[str], hdi_prob: float) -> None:
    """Rows of ``samples [N, K]`` on ``ax``: HDI, interquartile range and mean; ``labels[0]`` on top."""
    lo, hi = _hdi(samples, hdi_prob)  # [K], [K]
    q25, q75 = np.quantile(samples, [0.25, 0.75], axis=0)  # [K], [K]
    y = np.arange(len(labels))[::-1]  # the first item on top
    color = "C0"
    ax.hlines(y, lo, hi, color=color, lw=1.5)
    ax.hlines(y, q25, q75, color=color, lw=4)
    ax.plot(samples.mean(0), y, "o", color=color, markerfacecolor="white", ms=5, zorder=3)
    ax.set_yticks(y[::-1], labels[::-1])  # ticks ascending: the bottom row's label first
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.tick_params(axis="y", length=0)
    for side in ("left", "right"):
        ax.spines[side].set_visible(False)


# -- the summarize job -----------------------------------------------------------------------
def _write_posterior(idata, path: Path) -> None:
    """``idata`` as netCDF-4 through h5netcdf: ``InferenceData.to_netcdf`` (ArviZ 0.x) and
    ``DataTree.to_netcdf`` (ArviZ 1.x) both write one netCDF group per ArviZ group."""
    idata.to_netcdf(str(path), engine="h5netcdf")


def write_summary(fit_or_guide, out, *, sizes=DEFAULT_SIZES, size: float = 0.5, table_sizes=None, n_draws: int = 200,
                  seed: int = 0, hdi_prob: float = 0.94, low: float = 0.1, high: float = 0.9,
                  overwrite: bool = False) -> dict:
    """Draw the posterior and write its tables and plots to the directory ``out``.

    Written atomically (all files or none): ``summary.csv`` (:func:`summary` of every
    variable, at ``table_sizes`` for the size-dependent ones), ``posterior.nc``
    (:func:`to_inference_data`, netCDF-4 through h5netcdf), ``keep_curves.png``
    (:func:`plot_keep_curves`), ``forest.png`` (:func:`plot_forest` at ``size``) and
    ``ambiguous.json`` (:func:`ambiguous_units` at ``size``, with the settings); for a fit
    whose held-out evaluations kept their masks (``eval_sizes``), also ``masks_over_fit.json``
    and ``masks_over_fit_SIZE.png`` for each evaluated size (:mod:`~ppn_bayes.inspect.trajectory`:
    the units each layer kept at each evaluation). The same files, columns and groups under
    ArviZ 0.x and 1.x.

    Parameters
    ----------
    fit_or_guide : PuppetFit or PuppetGuide
        The fitted network or its guide.
    out : str or Path
        Output directory; refused when it exists unless ``overwrite``.
    sizes : sequence of float, default DEFAULT_SIZES
        Sizes to draw at; ``size`` is added to them.
    size : float, default 0.5
        The size of the forest plot and the ambiguous units.
    table_sizes : sequence of float, optional
        Sizes of the size-dependent rows of ``summary.csv`` (default: ``[size]``; every
        size is in ``posterior.nc``). Each is added to ``sizes``.
    n_draws : int, default 200
        Draws from the guide.
    seed : int, default 0
        Seed of the draws.
    hdi_prob : float, default 0.94
        Probability mass of the HDIs.
    low : float, default 0.1
        Lower bound of the ambiguous band.
    high : float, default 0.9
        Upper bound of the ambiguous band.
    overwrite : bool, default False
        Replace an existing ``out``.

    Returns
    -------
    dict
        ``{name: path}`` of the files written, and ``n_ambiguous``.

    Raises
    ------
    ImportError
        When ArviZ, h5netcdf or h5py is missing (before anything is drawn or written).
    """
    import json

    import matplotlib.pyplot as plt

    _arviz()  # both refused with the extra to install, before any draw
    _require_netcdf()
    table_sizes = check_sizes([size] if table_sizes is None else table_sizes)
    all_sizes = check_sizes([*np.atleast_1d(sizes).tolist(), size, *table_sizes.tolist()])
    draws = posterior_draws(fit_or_guide, sizes=all_sizes, n_draws=n_draws, seed=seed)
    idata = to_inference_data(draws)
    table = summary(idata, sizes=table_sizes, hdi_prob=hdi_prob)
    ambiguous = ambiguous_units(draws, size=size, low=low, high=high, hdi_prob=hdi_prob)
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        table.to_csv(tmp / "summary.csv", float_format="%.6g")
        _write_posterior(idata, tmp / "posterior.nc")
        fig = plot_keep_curves(draws, hdi_prob=hdi_prob, path=tmp / "keep_curves.png")
        plt.close(fig)
        fig = plot_forest(draws, size=size, low=low, high=high, hdi_prob=hdi_prob, path=tmp / "forest.png")
        plt.close(fig)
        record = {
            "size": float(size), "low": low, "high": high, "hdi_prob": hdi_prob, "n_draws": draws.n_draws,
            "seed": seed, "units": ambiguous.to_dict(orient="records"),
        }
        (tmp / "ambiguous.json").write_text(json.dumps(record, indent=1))
        over_fit = _write_masks_over_fit(fit_or_guide, tmp)
    names = ["summary.csv", "posterior.nc", "keep_curves.png", "forest.png", "ambiguous.json", *over_fit]
    return {**{name: str(out / name) for name in names}, "n_ambiguous": len(ambiguous)}


def _write_masks_over_fit(fit_or_guide, folder: Path) -> list[str]:
    """For a fit whose evaluations kept their masks: ``masks_over_fit.json`` (the per-layer
    counts of every evaluated size, :mod:`~ppn_bayes.inspect.trajectory`) and one
    ``masks_over_fit_SIZE.png`` a size; nothing for a guide or a fit without them."""
    import json

    import matplotlib.pyplot as plt

    from .trajectory import evaluated_sizes, mask_trajectory, plot_mask_trajectory

    result = getattr(fit_or_guide, "result", None)
    validation = list(getattr(result, "validation", None) or [])
    sizes = evaluated_sizes(validation)
    if not sizes:
        return []
    arch = _guide_of(fit_or_guide).arch
    trajectories = [mask_trajectory(validation, arch, size) for size in sizes]
    names = ["masks_over_fit.json"]
    (folder / names[0]).write_text(json.dumps([t.to_dict() for t in trajectories]))
    for trajectory in trajectories:
        names.append(f"masks_over_fit_{trajectory.size:g}.png")
        plt.close(plot_mask_trajectory(trajectory, path=folder / names[-1]))
    return names
