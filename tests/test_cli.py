"""The command line end to end, and the README's Python example."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ppn_bayes.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    raise AssertionError("no subcommands")


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "ppn_bayes", "--help"], capture_output=True, text=True, check=True)
    for command in _subparsers(build_parser()):
        assert command in out.stdout
    assert {"demo", "fit"} <= set(_subparsers(build_parser()))


def test_every_flag_of_every_subcommand_is_documented():
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and action.help.strip(), f"ppn-bayes {name} {action.option_strings[0]} lacks help"


def test_the_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--pretrain-steps", "20", "--fit-steps", "3", "--eval-windows", "2",
                 "--sizes", "0.8", "0.4", "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    assert "ppn_bayes" in table and "random cut" in table
    result = json.loads((out / "result.json").read_text())
    assert [row["size_requested"] for row in result["rows"]] == [0.8, 0.4]
    assert all(row["size_reached"] <= row["size_requested"] for row in result["rows"])
    assert (out / "perplexity.png").stat().st_size > 0
    assert (out / "checkpoint" / "state.json").is_file()
    # A second run into the same folder is refused.
    assert main(["demo", "--out", str(out), "--fit-steps", "1", "--quiet"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_fit_cli_on_a_local_model(tmp_path):
    from conftest import tiny_lm

    from ppn_bayes import CharTokenizer, embedded_text
    from ppn_bayes.lm import save_lm

    text = embedded_text()[:20_000]
    tokenizer = CharTokenizer.for_text(embedded_text())
    lm = tiny_lm("llama", vocab_size=tokenizer.vocab_size)
    save_lm(lm, tokenizer, tmp_path / "model")
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "held_out.txt").write_text(embedded_text()[20_000:24_000])
    out = subprocess.run(
        ["ppn-bayes", "fit", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.txt"),
         "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
         "--mlp-group", "32", "--quiet", "--eval-data", str(tmp_path / "held_out.txt"), "--eval-windows", "2"],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed["steps"] == 2 and printed["held_out"]["step"] == 2
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["config"]["steps"] == 2 and result["validation"][0]["windows"] == 2
    # A resume without --eval-data reports no held-out figure of the earlier run as its own.
    common = ["--model", str(tmp_path / "model"), "--batch-size", "2", "--seq-len", "32", "--mlp-group", "32",
              "--quiet"]
    resumed = subprocess.run(["ppn-bayes", "fit", *common, "--data", str(tmp_path / "train.txt"), "--out",
                              str(tmp_path / "run"), "--steps", "3", "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    printed = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert printed["steps"] == 3 and "held_out" not in printed
    # Several sources with mixing weights, recorded with the fit.
    mixed = subprocess.run(["ppn-bayes", "fit", *common, "--data", f"{tmp_path / 'train.txt'}:0.75",
                            f"{tmp_path / 'held_out.txt'}:0.25", "--out", str(tmp_path / "mixed"), "--steps", "1"],
                           capture_output=True, text=True)
    assert mixed.returncode == 0, mixed.stderr
    data = json.loads((tmp_path / "mixed" / "result.json").read_text())["data"]
    assert [(Path(s["path"]).name, s["weight"]) for s in data["sources"]] == [("train.txt", 0.75),
                                                                             ("held_out.txt", 0.25)]
    bad = subprocess.run(["ppn-bayes", "fit", "--model", str(tmp_path / "nothing"), "--data", "x", "--out",
                          str(tmp_path / "run2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run(["ppn-bayes", "fit", "--model", str(tmp_path / "model"), "--data",
                          str(tmp_path / "train.txt"), "--out", str(tmp_path / "run3"), "--size-min", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "0 < size_min" in bad.stderr


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["masks"].kept_params <= 0.5 * namespace["fitted"].arch.total_cost


def test_the_readme_commands_are_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"# run the tests\n(.+)\n", readme).group(1).strip()
    assert test_command in ci


@pytest.mark.slow
def test_the_default_demo_shows_fitted_sub_networks_ahead_of_random_cuts(tmp_path):
    """The README's first command at its default settings (about 3 minutes on 2 cores)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "result.json").read_text())["rows"]
    assert all(row["ppl_ppn"] < row["ppl_random"] for row in rows)
