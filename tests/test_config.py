"""Settings by concern: every field's help, concern and identity live in its metadata; the
CLI's flags come from them; one Budget value checks sizes and parameter counts."""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import pytest
from conftest import tiny_lm
from hypothesis import given
from hypothesis import strategies as st

from ppn_bayes import Ranking, describe
from ppn_bayes.cli import build_parser
from ppn_bayes.cli.options import add_config_options, config_from
from ppn_bayes.core.budget import Budget, check_size
from ppn_bayes.core.config import CONCERNS, FIT_HELP, NOT_IDENTIFYING, FitConfig, setting
from ppn_bayes.deploy.finetune import DistillConfig
from ppn_bayes.train.checkpoint import RESUMABLE_SETTINGS

#: The lists written by hand before the metadata: the resumable settings of
#: train/checkpoint.py and the bookkeeping settings of benchmarks/report.py.
OLD_RESUMABLE = {"steps", "checkpoint_every", "log_every", "parallel", "batch_size", "accumulate", "eval_every",
                 "eval_windows", "eval_sizes", "compile"}
OLD_REPORT_BOOKKEEPING = {"checkpoint_every", "log_every", "parallel", "eval_every", "eval_windows"}


def missing_metadata(cls: type, concerns: tuple[str, ...] | None) -> list[str]:
    """The fields of ``cls`` whose metadata lacks a help text, a concern (one of
    ``concerns`` when given) or a boolean ``identifies``."""
    bad = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not (isinstance(meta.get("help"), str) and meta["help"].strip() and isinstance(meta.get("identifies"), bool)
                and meta.get("concern") and (concerns is None or meta["concern"] in concerns)):
            bad.append(f.name)
    return bad


@pytest.mark.parametrize("cls, concerns", [(FitConfig, CONCERNS), (DistillConfig, CONCERNS)])
def test_every_settings_field_carries_help_concern_and_identity(cls, concerns):
    assert missing_metadata(cls, concerns) == []


def test_a_field_without_metadata_is_caught():
    @dataclasses.dataclass(frozen=True)
    class Settings:
        documented: int = setting(1, "run", "a documented field")
        bare: int = 2

    @dataclasses.dataclass(frozen=True)
    class Elsewhere:
        odd: int = setting(1, "appearance", "a field of no known concern")

    assert missing_metadata(Settings, CONCERNS) == ["bare"]
    assert missing_metadata(Elsewhere, CONCERNS) == ["odd"]


def test_fit_help_is_the_fields_help():
    assert list(FIT_HELP) == [f.name for f in dataclasses.fields(FitConfig)]
    assert FIT_HELP["steps"] == "training steps"


def test_the_concerns_partition_the_settings():
    config = FitConfig(steps=7, prior_weight=0.5, eval_sizes=(0.4,))
    parts = [config.concern(name) for name in CONCERNS]
    assert sum(len(p) for p in parts) == len(dataclasses.fields(FitConfig))
    assert {k: v for p in parts for k, v in p.items()} == config.to_dict()
    assert config.concern("prior")["prior_weight"] == 0.5 and config.concern("optimisation")["steps"] == 7
    assert "eval_sizes" in config.concern("run") and "size_min" in config.concern("objective")
    with pytest.raises(ValueError, match="concern must be one of 'prior', 'objective', 'optimisation', 'run'"):
        config.concern("sizes")


def test_one_notion_of_what_identifies_a_fit():
    # The settings that do not change a fit: the report's old list, and eval_sizes and compile,
    # which the resume already allowed to change.
    assert set(NOT_IDENTIFYING) == OLD_REPORT_BOOKKEEPING | {"eval_sizes", "compile"}
    # A resume may change those, and steps and the batch split, under their own checks.
    assert sorted(RESUMABLE_SETTINGS) == sorted(OLD_RESUMABLE)
    assert set(RESUMABLE_SETTINGS) - set(NOT_IDENTIFYING) == {"steps", "batch_size", "accumulate"}


def test_fit_flags_are_grouped_by_concern():
    fit = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["fit"]
    grouped = {g.title: {a.dest for a in g._group_actions} for g in fit._action_groups}
    for name in CONCERNS:
        assert grouped[f"fit settings: {name} (FitConfig)"] == set(FitConfig().concern(name))


def _distill_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_options(parser, DistillConfig, DistillConfig())
    return parser


def test_distill_flags_are_generated_with_the_defaults_and_bounds():
    parser = _distill_parser()
    flags = {a.option_strings[0] for a in parser._actions if a.dest != "help"}
    assert flags == {"--steps", "--batch-size", "--seq-len", "--lr", "--weight-decay", "--adam-beta2", "--distill-weight",
                     "--grad-clip", "--seed", "--log-every", "--checkpoint-every", "--nll-weight", "--lr-schedule",
                     "--warmup-steps", "--compile"}
    assert DistillConfig(**config_from(parser.parse_args([]), DistillConfig)) == DistillConfig()
    changed = parser.parse_args(["--lr", "1e-4", "--seed", "-1", "--lr-schedule", "cosine", "--warmup-steps", "0"])
    assert DistillConfig(**config_from(changed, DistillConfig)) == DistillConfig(lr=1e-4, seed=-1, lr_schedule="cosine")
    for bad in (["--lr", "0"], ["--steps", "0"], ["--weight-decay", "-1"], ["--checkpoint-every", "-1"],
                ["--lr-schedule", "linear"], ["--distill-weight", "nan"], ["--compile", "tvm"], ["--adam-beta2", "1"]):
        with pytest.raises(argparse.ArgumentError):
            parser.parse_args(bad)


@pytest.mark.parametrize("size", [0, 0.0, -0.1, 1.5, math.nan, math.inf, True, "half", None])
def test_a_budget_refuses_a_bad_size(size):
    with pytest.raises(ValueError, match=r"^size must lie in \(0, 1\], got "):
        check_size(size)
    if size is not None:
        with pytest.raises(ValueError, match=r"^size must lie in \(0, 1\], got "):
            Budget(size=size)


@pytest.mark.parametrize("count", [0, -3, 1.5, math.nan, math.inf, True, "ten"])
def test_a_budget_refuses_a_bad_parameter_count(count):
    with pytest.raises(ValueError, match="^a parameter count must be an integer of at least 1, got "):
        Budget(n_params=count)


@pytest.mark.parametrize("kwargs", [{}, {"size": 0.5, "n_params": 10}])
def test_a_budget_is_exactly_one_of_size_and_count(kwargs):
    with pytest.raises(ValueError, match="^give exactly one of a size and a parameter count"):
        Budget(**kwargs)


def test_a_budget_normalises_its_number_types():
    by_size = Budget(size=np.float32(0.5))
    assert type(by_size.size) is float and by_size.size == 0.5 and by_size.n_params is None
    by_count = Budget(n_params=np.int64(7))
    assert type(by_count.n_params) is int and by_count.params(100) == 7
    assert Budget(n_params=8.0).n_params == 8 and Budget(size=1).size == 1.0


@given(st.floats(min_value=0, max_value=1, exclude_min=True), st.integers(1, 10**9))
def test_a_size_budget_rounds_its_parameters_down(size, total):
    assert Budget(size=size).params(total) == int(size * total)


def test_ranking_masks_for_a_budget_match_the_size_and_count_paths():
    ranking = Ranking.random(describe(tiny_lm("llama"), mlp_group=32))
    half = ranking.total_params // 2
    for budget, direct in ((Budget(size=0.5), ranking.masks(0.5)), (Budget(n_params=half), ranking.masks_for_params(half))):
        got = ranking.masks_for(budget)
        assert got.kept_params == direct.kept_params and got.size_requested == direct.size_requested
        assert bool((got.unit == direct.unit).all()) and bool((got.layer == direct.layer).all())


def test_a_recipe_sets_its_settings_over_the_defaults_and_given_flags_win(capsys):
    from ppn_bayes.cli.options import fit_config_from
    from ppn_bayes.core.config import RECIPES

    # the default fit's 200 steps: the record's 100, 1,500 and 300 of 3,052 scaled and rounded
    record = {**RECIPES["record"], "warmup_steps": 7, "settle_steps": 98, "average_steps": 20}
    assert FitConfig.recipe("record") == FitConfig(**record)
    assert FitConfig.recipe("record", steps=7).steps == 7 and FitConfig.recipe("default") == FitConfig()
    with pytest.raises(ValueError, match="unknown recipe 'nope'; known: default, record"):
        FitConfig.recipe("nope")

    def config(*flags):
        return fit_config_from(build_parser().parse_args(["fit", "--model", "m", "--data", "d", "--out", "o", *flags]))

    assert config() == FitConfig()  # no recipe: the defaults, as before recipes existed
    assert config("--recipe", "record") == FitConfig(**record)
    # a flag given wins over the recipe, even one that gives the default's value (3e-5, not the record's 1e-3)
    given = config("--recipe", "record", "--lr-lm", str(FitConfig().lr_lm), "--train-full-lm", "--steps", "9")
    assert given == FitConfig(**{**record, "lr_lm": FitConfig().lr_lm, "train_full_lm": True, "steps": 9,
                                 "warmup_steps": 0, "settle_steps": 4, "average_steps": 1})
    with pytest.raises(SystemExit):
        config("--recipe", "nope")
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_the_record_recipe_scales_its_steps_set_apart_to_the_fits_length():
    """At the record's own 3,052 steps the recipe gives exactly its 100 warm-up, 1,500 settling
    and 300 averaging steps; at other lengths each is scaled and rounded, in CLI and Python
    alike; a span given wins; with the LM frozen there is no settling (it would train nothing)."""
    from ppn_bayes.cli.options import fit_config_from
    from ppn_bayes.core.config import RECIPE_SPANS, recipe_settings

    def config(*flags):
        return fit_config_from(build_parser().parse_args(["fit", "--model", "m", "--data", "d", "--out", "o", *flags]))

    record = config("--recipe", "record", "--steps", "3052")
    assert (record.warmup_steps, record.settle_steps, record.average_steps) == (100, 1500, 300)
    assert record == FitConfig.recipe("record", steps=3052)
    length, spans = RECIPE_SPANS["record"]
    for steps in (1, 2, 3, 10, 200, 1000, 6104, 30_520):
        fit = FitConfig.recipe("record", steps=steps)  # valid at every length: the spans fit in the steps
        assert {k: getattr(fit, k) for k in spans} == {k: round(v * steps / length) for k, v in spans.items()}
        assert config("--recipe", "record", "--steps", str(steps)) == fit
    assert FitConfig.recipe("record", steps=6104).settle_steps == 3000
    given = config("--recipe", "record", "--steps", "3052", "--settle-steps", "0", "--average-steps", "0")
    assert (given.warmup_steps, given.settle_steps, given.average_steps) == (100, 0, 0)
    frozen = config("--recipe", "record", "--steps", "3052", "--no-train-lm")
    assert (frozen.warmup_steps, frozen.settle_steps, frozen.average_steps, frozen.train_lm) == (100, 0, 0, False)
    assert FitConfig.recipe("record", steps=3052, train_lm=False) == frozen
    assert recipe_settings("default", 3052) == {}
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        recipe_settings("nope", 10)


def test_the_trained_range_spans_every_size_a_step_can_train():
    base = FitConfig(size_min=0.3, size_max=0.8, n_random_sizes=1)
    assert base.trained_range == (0.3, 1.0)  # the full LM's rows
    assert base.replace(train_full_lm=False).trained_range == (0.3, 0.8)  # the random sizes reach size_max
    assert base.replace(train_lm=False).trained_range == (0.3, 0.8)  # a frozen LM has no full-LM rows
    one = base.replace(train_full_lm=False, n_random_sizes=0)
    assert one.trained_range == (0.3, 0.3)  # size_min alone, as ppn_bayes-alone at 0.5
    assert one.replace(train_sizes=(0.5, 0.9)).trained_range == (0.3, 0.9)  # named sizes past size_max
