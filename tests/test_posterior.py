"""The gate posterior in ArviZ: draws, InferenceData, summaries, plots, ``ppn-bayes summarize``."""

from __future__ import annotations

import json

import numpy as np
import pyro
import pytest
import torch
from conftest import tiny_lm
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro import poutine

from ppn_bayes import FitConfig, GatedLM, describe, fit
from ppn_bayes.inspect import posterior as P
from ppn_bayes.cli import main
from ppn_bayes.core.model import PuppetGuide, PuppetModel

az = pytest.importorskip("arviz")

SIZES = [0.3, 0.5, 0.8, 1.0]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny Llama fitted for 3 steps, with its checkpoint."""
    lm = tiny_lm("llama")
    tokens = torch.randint(0, 97, (4000,), generator=torch.Generator().manual_seed(0))
    checkpoint = tmp_path_factory.mktemp("fit") / "ckpt"
    return fit(lm, tokens, FitConfig(steps=3, batch_size=2, seq_len=32, mlp_group=32), checkpoint=checkpoint,
               progress=False)


@pytest.fixture(scope="module")
def draws(fitted):
    return P.posterior_draws(fitted, sizes=SIZES, n_draws=40, seed=1)


def _guide(**options):
    arch = describe(tiny_lm("llama"), mlp_group=32)
    guide = PuppetGuide(arch, **options)
    with torch.no_grad():  # spread the scales so that units differ
        guide.loc_unit.copy_(torch.randn(guide.loc_unit.shape, generator=torch.Generator().manual_seed(3)))
        guide.log_scale_unit.fill_(np.log(0.5))
    return guide


# -- draws -----------------------------------------------------------------------------------
def test_draws_solve_the_budget_equation_at_every_size(draws):
    D, S, L, U = 40, len(SIZES), 3, 6
    assert draws.keep_unit.shape == (D, S, L, U) and draws.keep_layer.shape == (D, S, L)
    assert draws.log_tau.shape == (D, S) and draws.expected_size.shape == (D, S)
    np.testing.assert_allclose(draws.expected_size, np.broadcast_to(SIZES, (D, S)), atol=1e-9)
    # The hierarchy: a unit is never kept more surely than its layer.
    assert (draws.keep_unit <= draws.keep_layer[..., None] + 1e-12).all()
    # Pressing the base: τ and every keep probability grow with the size.
    assert (np.diff(draws.log_tau, axis=1) > 0).all()
    assert (np.diff(draws.keep_unit, axis=1) >= -1e-12).all()


def test_draws_match_the_pyro_model_traced_at_the_same_scales():
    """Differential test: τ and the expected size of the model's deterministic sites."""
    guide = _guide()
    lm = tiny_lm("llama")
    pyro.settings.set(module_local_params=True)
    model = PuppetModel(GatedLM(lm, guide.arch))
    draws = P.posterior_draws(guide, sizes=[0.4, 0.7], n_draws=4, seed=5)
    x = torch.randint(0, 97, (1, 8))
    for d in range(2):
        for s, size in enumerate(draws.sizes):
            data = {
                "lambda_layer": torch.tensor(np.exp(draws.log_lambda_layer[d]), dtype=torch.float32)[:, None],
                "lambda_unit": torch.tensor(np.exp(draws.log_lambda_unit[d]), dtype=torch.float32),
            }
            trace = poutine.trace(poutine.condition(model, data=data)).get_trace(x, float(size))
            tau = float(trace.nodes["tau"]["value"])
            assert tau == pytest.approx(float(np.exp(draws.log_tau[d, s])), rel=1e-4)
            assert float(trace.nodes["expected_size"]["value"]) == pytest.approx(size, abs=1e-5)


def test_draws_are_reproducible_by_seed():
    guide = _guide()
    a = P.posterior_draws(guide, sizes=[0.5], n_draws=8, seed=7)
    b = P.posterior_draws(guide, sizes=[0.5], n_draws=8, seed=7)
    c = P.posterior_draws(guide, sizes=[0.5], n_draws=8, seed=8)
    np.testing.assert_array_equal(a.keep_unit, b.keep_unit)
    assert not np.array_equal(a.keep_unit, c.keep_unit)


def test_point_posterior_has_no_spread_and_flat_guide_has_no_layer_scales():
    point = P.posterior_draws(_guide(posterior="point"), sizes=[0.5], n_draws=6)
    assert np.ptp(point.keep_unit, axis=0).max() == 0
    flat = P.posterior_draws(_guide(hierarchy=False), sizes=[0.5], n_draws=6)
    assert not flat.hierarchy
    idata = P.to_inference_data(flat)
    assert "lambda_layer" not in idata.posterior and "lambda_unit" in idata.posterior


@pytest.mark.parametrize("bad", [[0.0], [1.2], [-0.5, 0.5], []])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="size"):
        P.posterior_draws(_guide(), sizes=bad, n_draws=4)


def test_bad_draws_and_inputs_are_refused():
    with pytest.raises(ValueError, match="n_draws"):
        P.posterior_draws(_guide(), sizes=[0.5], n_draws=3)
    with pytest.raises(TypeError, match="PuppetFit or a PuppetGuide"):
        P.posterior_draws("not a guide", sizes=[0.5])
    with pytest.raises(TypeError, match="InferenceData"):
        P.ambiguous_units({"posterior": {}}, size=0.5)


def test_sizes_are_sorted_and_deduplicated():
    np.testing.assert_array_equal(P.check_sizes([0.5, 0.2, 0.5, 1.0]), [0.2, 0.5, 1.0])
    np.testing.assert_array_equal(P.check_sizes(0.3), [0.3])


# -- InferenceData ---------------------------------------------------------------------------
def test_inference_data_has_named_dims_and_coordinates(draws, fitted):
    idata = P.to_inference_data(draws)
    post = idata.posterior
    expected = {
        "lambda_layer": ("chain", "draw", "layer"),
        "lambda_unit": ("chain", "draw", "layer", "unit"),
        "tau": ("chain", "draw", "size"),
        "keep_layer": ("chain", "draw", "size", "layer"),
        "keep_unit": ("chain", "draw", "size", "layer", "unit"),
        "expected_size": ("chain", "draw", "size"),
    }
    assert {name: post[name].dims for name in expected} == expected
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == 40
    assert list(post["unit"].values) == ["attn0", "attn1", "mlp0", "mlp1", "mlp2", "mlp3"]
    np.testing.assert_array_equal(post["size"].values, SIZES)
    # λ on the natural scale, τ too.
    np.testing.assert_allclose(post["lambda_unit"].values[0], np.exp(draws.log_lambda_unit))
    np.testing.assert_allclose(post["tau"].values[0], np.exp(draws.log_tau))
    np.testing.assert_array_equal(post["keep_unit"].sel(size=0.5).values[0], draws.keep_unit[:, 1])
    costs = idata.constant_data
    assert int(costs["layer_cost"].sum() + costs["unit_cost"].sum()) == fitted.arch.total_cost


def test_inference_data_from_a_fit_directly(fitted):
    idata = P.to_inference_data(fitted, sizes=[0.5], n_draws=5)
    assert idata.posterior.sizes["draw"] == 5 and list(idata.posterior["size"].values) == [0.5]


def test_inference_data_round_trips_through_netcdf(draws, tmp_path):
    idata = P.to_inference_data(draws)
    idata.to_netcdf(str(tmp_path / "p.nc"), engine="h5netcdf")
    back = az.from_netcdf(tmp_path / "p.nc")
    np.testing.assert_array_equal(back.posterior["keep_unit"].values, idata.posterior["keep_unit"].values)
    assert list(back.posterior["unit"].values) == list(idata.posterior["unit"].values)
    assert back.posterior.attrs["inference_library"] == "ppn_bayes"


#: What posterior.nc holds under either ArviZ generation: netCDF groups, their variables
#: (coordinates included) and the attributes ppn_bayes sets on the root and on each group.
NETCDF_GROUPS = {
    "posterior": {"chain", "draw", "layer", "unit", "size", "lambda_layer", "lambda_unit", "tau", "keep_layer",
                  "keep_unit", "expected_size"},
    "constant_data": {"layer", "unit", "layer_cost", "unit_cost"},
}
NETCDF_ATTRS = {"inference_library": "ppn_bayes", "model_type": "llama", "guide_posterior": "normal",
                "hierarchy": 1, "lambda_scale": "natural (not log)"}


def _netcdf_layout(path):
    """Groups, variables and ppn_bayes's attributes of a netCDF-4 file, read with h5py (no ArviZ)."""
    import h5py

    def ours(attrs):
        return {key: (value.decode() if isinstance(value, bytes) else value.item() if hasattr(value, "item")
                      else value) for key, value in attrs.items() if key in NETCDF_ATTRS}

    with h5py.File(path, "r") as f:
        groups = {name: set(f[name].keys()) for name in f.keys()}
        attrs = {"/": ours(f.attrs), **{name: ours(f[name].attrs) for name in f.keys()}}
    return groups, attrs


def test_netcdf_layout_is_the_same_under_either_arviz_generation(draws, tmp_path):
    """posterior.nc is one netCDF group per ArviZ group, with ppn_bayes's attributes on each."""
    P.to_inference_data(draws).to_netcdf(str(tmp_path / "p.nc"), engine="h5netcdf")
    groups, attrs = _netcdf_layout(tmp_path / "p.nc")
    assert groups == NETCDF_GROUPS
    assert attrs == {"/": NETCDF_ATTRS, "posterior": NETCDF_ATTRS, "constant_data": NETCDF_ATTRS}


# -- tables ----------------------------------------------------------------------------------
def test_summary_has_the_arviz_columns_and_the_draws_means(draws):
    table = P.summary(draws, sizes=[0.5], hdi_prob=0.9)
    # ArviZ 0.x's columns and order under either generation (1.x's hdi90_lb/_ub renamed).
    assert list(table.columns) == ["mean", "sd", "hdi_5%", "hdi_95%", "mcse_mean", "mcse_sd", "ess_bulk", "ess_tail"]
    assert list(P.summary(draws, var_names=["tau"], sizes=[0.5]).columns) == list(P.SUMMARY_COLUMNS)
    L, U = 3, 6
    # lambda_layer L, lambda_unit L·U, tau 1, keep_layer L, keep_unit L·U, expected_size 1 at one size.
    assert len(table) == L + L * U + 1 + L + L * U + 1
    assert table.loc["keep_unit[0.5, 2, mlp1]", "mean"] == pytest.approx(draws.keep_unit[:, 1, 2, 3].mean())
    assert table.loc["keep_layer[0.5, 0]", "sd"] == pytest.approx(draws.keep_layer[:, 1, 0].std(ddof=1), rel=1e-6)
    assert (table["hdi_5%"] <= table["mean"] + 1e-12).all() and (table["mean"] <= table["hdi_95%"] + 1e-12).all()
    # Independent draws: the bulk ESS of a keep probability is of the order of the draws.
    assert table.filter(like="keep_", axis=0)["ess_bulk"].between(10, 200).all()
    rounded = P.summary(draws, var_names=["keep_layer"], sizes=[0.5], round_to=3)
    np.testing.assert_allclose(rounded["mean"].to_numpy(float), draws.keep_layer[:, 1].mean(0), atol=5e-4 + 1e-12)
    np.testing.assert_array_equal(rounded["mean"].to_numpy(float), np.round(rounded["mean"].to_numpy(float), 3))
    with pytest.raises(ValueError, match="was not drawn"):
        P.summary(draws, sizes=[0.55])
    with pytest.raises(ValueError, match="hdi_prob"):
        P.summary(draws, sizes=[0.5], hdi_prob=1.0)


def test_summary_uses_arviz_hdi(draws):
    """The HDI of the curves is ArviZ's HDI."""
    table = P.summary(draws, var_names=["keep_unit"], sizes=[0.8], hdi_prob=0.8)
    low, high = P._hdi(draws.keep_unit[:, 2], 0.8)
    np.testing.assert_allclose(table["hdi_10%"].to_numpy(), low.ravel())
    np.testing.assert_allclose(table["hdi_90%"].to_numpy(), high.ravel())


def test_summary_tail_ess_is_at_the_5_and_95_percent_quantiles(draws):
    """ess_tail is ArviZ's tail ESS at the 5% and 95% quantiles under either generation
    (ArviZ 1.x's summary alone would take the quantiles of its ci_prob, 0.89)."""
    idata = P.to_inference_data(draws)
    table = P.summary(idata, var_names=["keep_unit"], sizes=[0.5])
    reference = az.ess(idata, var_names=["keep_unit"], method="tail", prob=(0.05, 0.95))
    reference = getattr(reference, "posterior", reference)  # a DataTree under ArviZ 1.x
    expected = np.asarray(reference["keep_unit"].sel(size=0.5).values).ravel()
    np.testing.assert_array_equal(table["ess_tail"].to_numpy(), expected)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=5, max_size=60), st.floats(0.5, 0.97))
def test_hdi_is_the_shortest_interval_holding_the_mass(values, prob):
    samples = np.asarray(values)
    low, high = P._hdi(samples, prob)
    ordered = np.sort(samples)
    width = int(np.floor(prob * len(samples)))
    assert np.mean((samples >= low) & (samples <= high)) >= width / len(samples)
    shortest = min(ordered[i + width] - ordered[i] for i in range(len(samples) - width)) if width else None
    if shortest is not None and width < len(samples):
        assert high - low == pytest.approx(shortest)


def test_ambiguous_units_are_those_with_keep_probability_in_the_band():
    guide = _guide()
    draws = P.posterior_draws(guide, sizes=[0.5], n_draws=30, seed=2)
    table = P.ambiguous_units(draws, size=0.5, low=0.1, high=0.9)
    mean_unit, mean_layer = draws.keep_unit[:, 0].mean(0), draws.keep_layer[:, 0].mean(0)
    labels = P.unit_labels(guide.arch)
    expected = {(l, labels[u]) for l, u in zip(*np.nonzero((mean_unit > 0.1) & (mean_unit < 0.9)))}
    expected |= {(l, "layer") for l in np.flatnonzero((mean_layer > 0.1) & (mean_layer < 0.9))}
    assert set(zip(table["layer"], table["unit"])) == expected
    assert 0 < len(expected) < mean_unit.size + mean_layer.size  # the band cuts somewhere
    distance = np.abs(table["keep"].to_numpy() - 0.5)
    assert (np.diff(distance) >= 0).all()
    assert ((table["hdi_low"] <= table["keep"]) & (table["keep"] <= table["hdi_high"])).all()
    # A guide is drawn at the size itself; a narrower band holds fewer units.
    from_guide = P.ambiguous_units(guide, size=0.5, low=0.4, high=0.6)
    assert len(from_guide) <= len(P.ambiguous_units(guide, size=0.5))


def test_ambiguous_units_refuse_bad_bands_and_undrawn_sizes(draws):
    with pytest.raises(ValueError, match="low < high"):
        P.ambiguous_units(draws, size=0.5, low=0.9, high=0.1)
    with pytest.raises(ValueError, match="was not drawn"):
        P.ambiguous_units(draws, size=0.42)


def test_ambiguous_units_from_inference_data_equal_those_from_draws(draws):
    a = P.ambiguous_units(draws, size=0.5)
    b = P.ambiguous_units(P.to_inference_data(draws), size=0.5)
    assert a.equals(b)


# -- plots -----------------------------------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_return_figures_and_write_png_atomically(draws, tmp_path):
    import matplotlib.pyplot as plt

    fig = P.plot_keep_curves(draws, path=tmp_path / "curves.png")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3
    plt.close(fig)
    fig = P.plot_keep_curves(P.to_inference_data(draws), layers=[2], units=False)
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "layer 2"
    plt.close(fig)
    fig = P.plot_forest(draws, size=0.5, items="all", path=tmp_path / "forest.png")
    assert len(fig.axes[0].get_yticklabels()) == 3 + 3 * 6
    plt.close(fig)
    fig = P.plot_forest(draws, size=0.8, items=[(0, "layer"), (1, "mlp2")])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["1/mlp2", "layer 0"]
    plt.close(fig)
    for name in ("curves.png", "forest.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "forest.png"]


def test_forest_shows_at_most_max_units_the_most_ambiguous_first():
    import matplotlib.pyplot as plt

    guide = _guide()
    draws = P.posterior_draws(guide, sizes=[0.5], n_draws=20, seed=2)
    ambiguous = P.ambiguous_units(draws, size=0.5)
    units = ambiguous[ambiguous["unit"] != "layer"]
    assert len(units) > 3
    fig = P.plot_forest(draws, size=0.5, max_units=3)
    labels = {t.get_text() for t in fig.axes[0].get_yticklabels()}
    plt.close(fig)
    closest = {f"{l}/{u}" for l, u in zip(units["layer"][:3], units["unit"][:3])}
    assert labels == closest | {f"layer {l}" for l in range(3)}
    assert f"{len(units) - 3} more units not shown" in fig.axes[0].get_title()


def test_plots_refuse_unknown_items(draws):
    with pytest.raises(ValueError, match="unknown item"):
        P.plot_forest(draws, size=0.5, items=[(7, "layer")])
    with pytest.raises(ValueError, match="unknown item"):
        P.plot_forest(draws, size=0.5, items=[(0, "mlp9")])
    with pytest.raises(ValueError, match="items must be"):
        P.plot_forest(draws, size=0.5, items="some")
    with pytest.raises(ValueError, match="unknown layers"):
        P.plot_keep_curves(draws, layers=[5])


# -- ppn-bayes summarize ---------------------------------------------------------------------
def test_summarize_writes_tables_and_plots(fitted, tmp_path):
    out = tmp_path / "summary"
    argv = ["summarize", fitted.result.checkpoint, "--out", str(out), "--sizes", "0.3", "0.6", "1.0",
            "--size", "0.5", "--draws", "20"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "ambiguous.json", "forest.png", "keep_curves.png", "posterior.nc", "summary.csv"]
    import pandas as pd

    table = pd.read_csv(out / "summary.csv", index_col=0)
    assert list(table.columns) == list(P.SUMMARY_COLUMNS)
    assert "keep_unit[0.5, 0, attn0]" in table.index  # --size is drawn as well, and tabled
    assert not any(name.startswith("keep_unit[0.3") for name in table.index)
    idata = az.from_netcdf(out / "posterior.nc")
    np.testing.assert_array_equal(idata.posterior["size"].values, [0.3, 0.5, 0.6, 1.0])
    assert _netcdf_layout(out / "posterior.nc")[0] == NETCDF_GROUPS
    record = json.loads((out / "ambiguous.json").read_text())
    assert record["size"] == 0.5 and record["n_draws"] == 20
    expected = P.ambiguous_units(P.posterior_draws(fitted, sizes=[0.3, 0.5, 0.6, 1.0], n_draws=20), size=0.5)
    assert [(u["layer"], u["unit"]) for u in record["units"]] == list(zip(expected["layer"], expected["unit"]))
    for name in ("forest.png", "keep_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG
    # An existing output is refused, then replaced with --overwrite.
    (out / "marker").write_text("old")
    assert main(argv) == 2
    assert (out / "marker").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "marker").exists()


def test_summary_without_h5netcdf_is_refused_before_writing(fitted, tmp_path, monkeypatch):
    """A missing netCDF engine names the extra to install; nothing is drawn or written."""
    import sys

    monkeypatch.setitem(sys.modules, "h5netcdf", None)  # import h5netcdf raises ImportError
    out = tmp_path / "summary"
    with pytest.raises(ImportError, match=r"h5netcdf.*ppn-bayes\[arviz\]"):
        P.write_summary(fitted, out, sizes=[0.5], n_draws=4)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_summarize_refuses_bad_sizes_before_writing(fitted, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["summarize", fitted.result.checkpoint, "--out", str(out), "--sizes", "0", "0.5"]) == 2
    assert "sizes must lie in (0, 1]" in capsys.readouterr().err
    assert main(["summarize", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert not out.exists()
