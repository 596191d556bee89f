"""benchmarks/protocol.py: one registry of methods and sizes, and no script keeps a list of its own."""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path

import pytest

from ppn_bayes.train.step import step_plan

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RECORDS = ROOT / "docs" / "benchmarks" / "records"
sys.path.insert(0, str(BENCHMARKS))
import protocol  # noqa: E402  (benchmarks/protocol.py)
import quality  # noqa: E402
import report  # noqa: E402


def _record_methods(benchmark: str) -> set[str]:
    path = RECORDS / f"{benchmark}.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return {json.loads(line)["method"] for line in lines if line.strip()}


def test_registry_ids_are_unique_and_every_method_has_a_label_a_family_and_a_builder():
    ids = [m.id for m in protocol.REGISTRY]
    assert len(ids) == len(set(ids)) == len(protocol.METHODS)
    for entry in protocol.REGISTRY:
        assert entry.label.strip() and entry.family in protocol.FAMILIES and entry.builder in protocol.BUILDERS
        assert protocol.label(entry.id) == entry.label


@pytest.mark.parametrize("benchmark", ["quality", "speed"])
def test_every_method_of_the_records_has_one_registry_entry(benchmark):
    """The methods the report labels: quality's and speed's records."""
    methods = _record_methods(benchmark)
    assert methods, f"no {benchmark} records to check"
    missing = sorted(methods - set(protocol.METHODS))
    assert not missing, f"add these {benchmark} methods to benchmarks/protocol.py: {missing}"


def test_quality_accepts_exactly_the_registry_methods_it_can_build():
    assert quality.METHODS == protocol.ids(quality=True)
    assert set(quality.DEFAULT_METHODS) <= set(quality.METHODS)
    # every builder of quality.py's methods has its runner, and every runner builds some method
    assert set(quality.RUNNERS) == {protocol.METHODS[m].builder for m in quality.METHODS}
    assert set(protocol.BUILDERS) - set(quality.RUNNERS) == {"zeros"}  # speed.py's alone
    with pytest.raises(ValueError, match="unknown methods"):  # in the registry, but speed.py builds it
        quality.QualityConfig(model="m", eval_text="e", train_text="t", methods=("magnitude-zeros",))


def test_quality_reads_fit_changes_and_fit_tokens_from_the_registry():
    assert quality.ABLATIONS == {"ppn_bayes-flat": {"hierarchy": False},
                                 "ppn_bayes-point": {"posterior": "point", "prior_weight": 0.0},
                                 "ppn_bayes-frozen": {"train_lm": False},
                                 "ppn_bayes-start": {"hold_steps": "steps", "settle_steps": 0, "average_steps": 0},
                                 "ppn_bayes-alone": {"size_min": 0.5, "n_random_sizes": 0},
                                 "ppn_bayes-nodistill": {"distill_weight": 0.0, "nll_weight": 1.0}}
    assert quality.FIT_TOKENS_METHODS == ("ppn_bayes-teacher", "ppn_bayes-kd-prefix-mix")
    assert quality.MIXING_METHODS == ("ppn_bayes", *quality.ABLATIONS, "ppn_bayes-short", "ppn_bayes-kd-prefix-mix")
    fit = quality.DEFAULT_FIT
    config = quality.QualityConfig(model="m", eval_text="e", train_text="t")
    for method in protocol.ids(builder="fit"):  # every fit's settings are valid from the fit of record
        quality.fit_config_of(config, method)  # FitConfig refuses e.g. neither loss (nll_weight=distill_weight=0)
    assert quality.fit_config_of(config, "ppn_bayes") == fit
    # a change that reads the fit's steps: the start held for every one of them
    held = quality.fit_config_of(dataclasses.replace(config, fit=fit.replace(steps=40, settle_steps=4,
                                                                              average_steps=4)), "ppn_bayes-start")
    assert held == fit.replace(steps=40, hold_steps=40)
    # one size: every row of every step trains 0.5, whatever the fit of record draws
    alone = quality.fit_config_of(config, "ppn_bayes-alone")
    assert alone == fit.replace(size_min=0.5, n_random_sizes=0) and not alone.train_sizes
    for step in range(5):
        plan = step_plan(alone, step, rows=16, first_row=0, global_rows=16, scale=1)
        assert plan.sizes == (0.5,) and plan.groups.eq(1).all() and plan.row_weights.sum().item() == 1.0
    assert len(step_plan(fit, 0, rows=16, first_row=0, global_rows=16, scale=1).sizes) > 1
    # the records count the networks a step trains: one alone, four in the fit of record, and
    # the full LM as one more where it has rows
    assert quality.sizes_per_step(alone) == 1 and quality.sizes_per_step(fit) == 4
    assert quality.sizes_per_step(fit.replace(train_full_lm=True, train_sizes=(0.5,))) == 6
    assert quality.fit_config_of(config, "ppn_bayes-kd-prefix") == fit.replace(
        teacher="original", nll_weight=0.0, gate_coupling="prefix")
    # a +distill method fine-tunes its base, the -long ones LONG_FINETUNE times as long
    assert protocol.method("ppn_bayes-original+distill-long").base == "ppn_bayes-original"
    assert protocol.method("ppn_bayes-original+distill-long").finetune_repeat == protocol.LONG_FINETUNE
    assert protocol.method("activation-uniform+distill").base == "activation-uniform"


def test_registry_refuses_an_inconsistent_entry():
    with pytest.raises(ValueError, match="family"):
        protocol.Method("x", "x", "ablations", "fit")
    with pytest.raises(ValueError, match="builder"):
        protocol.Method("x", "x", "ablation", "fitting")
    with pytest.raises(ValueError, match="base"):
        protocol.Method("x+distill", "x", "+distill", "fit+distill")
    with pytest.raises(ValueError, match="unknown method 'obs'"):
        protocol.method("obs")


# -- no script keeps its own list ------------------------------------------------------------------------------
def own_lists(source: str) -> list[str]:
    """Literal collections in ``source`` that list method ids (two or more) or sizes (two or more
    different fractions in (0, 1]; mixture weights ``[0.5, 0.5]`` are no sizes): what only
    benchmarks/protocol.py may hold."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            elements = node.elts
        elif isinstance(node, ast.Dict):
            elements = [k for k in node.keys if k is not None]
        else:
            continue
        values = [e.value for e in elements if isinstance(e, ast.Constant)]
        methods = [v for v in values if isinstance(v, str) and v in protocol.METHODS]
        sizes = {v for v in values if isinstance(v, float) and 0 < v <= 1}
        if len(methods) >= 2 or len(sizes) >= 2:
            found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_the_check_finds_a_list_of_methods_or_sizes():
    assert own_lists('RIVALS = ("sparsegpt", "wanda")\nx = ("dense", 1.0)') == [
        "line 1: ('sparsegpt', 'wanda')"]
    assert own_lists("SIZES = [0.9, 0.7]\nf(figsize=(7, 4.5), weights=[0.5, 0.5])\n") == ["line 1: [0.9, 0.7]"]
    assert own_lists('LABELS = {"dense": "dense", "wanda": "Wanda"}') != []


#: protocol.py holds the lists; jobs.py names the methods each step of the GPU job runs, as
#: gpu_job.sh did (tests/test_jobs.py checks them against the registry).
@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")
                                          if p.name not in ("protocol.py", "jobs.py")))
def test_no_benchmark_script_keeps_its_own_list_of_methods_or_sizes(script):
    found = own_lists((BENCHMARKS / script).read_text(encoding="utf-8"))
    assert not found, f"{script} lists methods or sizes: take them from benchmarks/protocol.py: {found}"


def test_the_page_is_what_the_report_makes_of_the_records(tmp_path):
    """docs/benchmarks.md is regenerated from the committed records, labels from the registry."""
    text = report.render(RECORDS, tmp_path / "benchmarks.md", tmp_path / "benchmarks")
    assert text == (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8"), (
        "docs/benchmarks.md is out of date: run python benchmarks/report.py")
    for method in _record_methods("quality") - {"dense", "ppn_bayes"}:
        assert f"| {protocol.label(method)}" in text and protocol.label(method) != method
