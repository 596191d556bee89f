"""The documentation site builds strictly, and documents every subcommand, flag and module."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ppn_bayes
from ppn_bayes.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
import gen_cli  # noqa: E402  (docs/gen_cli.py)


def _modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages(ppn_bayes.__path__, "ppn_bayes.")
                  if not info.name.endswith("__main__"))


def test_mkdocs_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    assert (site / "index.html").is_file()
    for page in ("getting-started", "method", "cli", "api", "formats", "scaling", "benchmarks"):
        assert (site / page / "index.html").is_file(), page


def test_cli_page_has_every_subcommand_and_every_flag():
    text = (DOCS / "cli.md").read_text()
    commands = gen_cli.subcommands(build_parser())
    assert len(commands) >= 3
    for name, _, sub in commands:
        assert f"\n## {name}\n" in text, f"docs/cli.md lacks subcommand {name}: run python docs/gen_cli.py"
        for action in sub._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                assert f"`{flag}`" in text, f"docs/cli.md lacks {name} {flag}: run python docs/gen_cli.py"
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_cli_page_is_current():
    current = (DOCS / "cli.md").read_text()
    assert current == gen_cli.render(build_parser()), "docs/cli.md is out of date: run python docs/gen_cli.py"


def test_gen_cli_check_flags_a_stale_page(tmp_path, monkeypatch):
    monkeypatch.setattr(gen_cli, "CLI_MD", tmp_path / "cli.md")
    assert gen_cli.main(["--check"]) == 1
    assert gen_cli.main([]) == 0
    assert gen_cli.main(["--check"]) == 0


def test_api_page_renders_every_module():
    text = (DOCS / "api.md").read_text()
    listed = set(re.findall(r"^::: (ppn_bayes[\w.]*)$", text, flags=re.M))
    wanted = {name for name in _modules() if name.count(".") == 1 and not name.split(".")[1].startswith("_")}
    wanted.add("ppn_bayes.cli")
    assert wanted - listed == set(), f"add these modules to docs/api.md: {sorted(wanted - listed)}"
    assert listed - wanted - {n for n in _modules()} == set()


def test_getting_started_mirrors_the_readme():
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is absent")
    blocks = re.findall(r"```(?:bash|python)\n(.*?)```", readme.read_text(), flags=re.S)
    assert blocks, "the README has no command or Python example"
    page = (DOCS / "getting-started.md").read_text()
    for block in blocks:
        assert block in page, f"docs/getting-started.md does not mirror this README block:\n{block}"


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _documented_pages() -> list[Path]:
    pages = sorted(DOCS.glob("*.md")) + [ROOT / "notebooks" / "README.md"]
    readme = ROOT / "README.md"
    return pages + ([readme] if readme.is_file() else [])


def test_every_documented_command_line_parses():
    """Each ``ppn-bayes ...`` line in the docs and the README is accepted by the parser."""
    import shlex

    parser = build_parser()
    seen = 0
    for page in _documented_pages():
        for block in _blocks(page.read_text(), "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                for piece in re.split(r"&&|;", line.split("#")[0]):
                    words = shlex.split(piece)
                    if "ppn-bayes" in words:
                        args = words[words.index("ppn-bayes") + 1:]
                    elif "ppn_bayes" in words and "-m" in words:
                        args = words[words.index("ppn_bayes") + 1:]
                    else:
                        continue
                    try:
                        parser.parse_args(args)
                    except SystemExit:
                        pytest.fail(f"{page.name}: `{piece.strip()}` is not a valid command line")
                    seen += 1
    assert seen >= 6


def test_documented_python_compiles():
    for page in _documented_pages():
        for block in _blocks(page.read_text(), "python"):
            compile(block, str(page), "exec")


def test_method_page_names_every_site_of_the_model():
    """Every sample and deterministic site of the Pyro model appears in method.md."""
    import pyro
    import torch
    from conftest import tiny_lm
    from pyro import poutine

    from ppn_bayes import GatedLM, describe
    from ppn_bayes.core.model import PuppetGuide, PuppetModel

    lm = tiny_lm("llama")
    arch = describe(lm, mlp_group=32)
    pyro.settings.set(module_local_params=True)
    model, guide = PuppetModel(GatedLM(lm, arch)), PuppetGuide(arch)
    x = torch.randint(0, 97, (1, 8))
    guide_trace = poutine.trace(guide).get_trace(x, 0.5)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, 0.5, None)
    sites = {name for name, site in trace.nodes.items() if site["type"] == "sample"}
    plates = {frame.name for site in trace.nodes.values() if site["type"] == "sample"
              for frame in site["cond_indep_stack"]}
    text = (DOCS / "method.md").read_text()
    for name in sorted(sites | plates):
        assert f"`{name}`" in text, f"docs/method.md does not name the site or plate {name}"
    assert "lambda-tau function" in text and "not implement" in text


# Public names that had no docstring when this test was written (owned by other modules'
# authors); remove a name once it is documented. Any other undocumented name fails.
KNOWN_UNDOCUMENTED = {
    "ppn_bayes.core.architecture.Architecture.n_units", "ppn_bayes.core.architecture.Architecture.heads_per_unit",
    "ppn_bayes.core.architecture.Architecture.total_cost", "ppn_bayes.core.architecture.Architecture.to_dict",
    "ppn_bayes.core.architecture.Architecture.from_dict", "ppn_bayes.cli.build_parser", "ppn_bayes.cli.main",
    "ppn_bayes.cli.fitting.register", "ppn_bayes.cli.options.fit_config_from",
    "ppn_bayes.core.config.FitConfig.to_dict", "ppn_bayes.core.config.FitConfig.from_dict",
    "ppn_bayes.core.config.FitConfig.replace", "ppn_bayes.data.CharTokenizer.for_text",
    "ppn_bayes.data.CharTokenizer.vocab_size", "ppn_bayes.data.CharTokenizer.encode",
    "ppn_bayes.data.CharTokenizer.decode", "ppn_bayes.data.CharTokenizer.save_pretrained",
    "ppn_bayes.data.CharTokenizer.from_pretrained", "ppn_bayes.demo.DemoResult.table",
    "ppn_bayes.inspect.evaluate.Perplexity.to_dict", "ppn_bayes.core.gating.Gates.ones", "ppn_bayes.lm.load_tokenizer",
    "ppn_bayes.core.ranking.Masks.size_reached", "ppn_bayes.core.ranking.Ranking.total_params",
    "ppn_bayes.decode.speculative.Speculation.accepted", "ppn_bayes.decode.speculative.Speculation.acceptance_rate",
    "ppn_bayes.decode.speculative.Speculation.mean_accepted", "ppn_bayes.decode.speculative.Speculation.tokens_per_step",
    "ppn_bayes.decode.speculative.Speculation.tokens_per_s",
}


def _inherited_doc(cls, name: str) -> bool:
    return any(inspect.getdoc(getattr(base, name, None)) for base in cls.__mro__[1:] if hasattr(base, name))


def undocumented() -> set[str]:
    """Public functions, classes, methods and properties of ppn_bayes without a docstring.

    Public: listed in the module's ``__all__`` (or, without one, defined there without a
    leading underscore). ``forward`` is documented by its module's class docstring.
    """
    missing = set()
    for module_name in _modules():
        module = importlib.import_module(module_name)
        if not inspect.getdoc(module):
            missing.add(module_name)
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n, o in vars(module).items() if not n.startswith("_")
                     and (inspect.isfunction(o) or inspect.isclass(o)) and o.__module__ == module_name]
        for name in names:
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not inspect.getdoc(obj):
                missing.add(f"{module_name}.{name}")
            if not inspect.isclass(obj):
                continue
            for member in vars(obj):
                if member.startswith("_") or member == "forward":
                    continue
                static = inspect.getattr_static(obj, member)
                if isinstance(static, (staticmethod, classmethod)):
                    static = static.__func__
                if not (inspect.isfunction(static) or isinstance(static, property)):
                    continue
                if not inspect.getdoc(static) and not _inherited_doc(obj, member):
                    missing.add(f"{module_name}.{name}.{member}")
    return missing


def test_every_public_name_has_a_docstring():
    missing = undocumented()
    new = sorted(missing - KNOWN_UNDOCUMENTED)
    assert not new, f"public names without a docstring (the API page renders docstrings): {new}"


def test_pages_hold_no_control_characters():
    """A backslash lost in an edit turns ``\\theta`` into a tab and ``heta``: LaTeX that no
    longer renders. Pages are plain text: no tabs, no other control characters."""
    for page in sorted([*DOCS.glob("*.md"), ROOT / "README.md"]):
        for number, line in enumerate(page.read_text().splitlines(), 1):
            bad = [c for c in line if ord(c) < 32]
            assert not bad, f"{page.name}:{number} holds control characters {bad!r}: {line[:80]!r}"
