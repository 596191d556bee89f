"""Every notebook runs, in smoke mode, through a real notebook runner.

The jupytext percent scripts in ``notebooks/`` are the source of truth: each is converted
to a notebook with jupytext and executed with nbclient on the ``python3`` kernel (which
jupyter_client starts with this interpreter, the venv's). A cell that raises fails the
test. ``PPN_SMOKE=1`` keeps each notebook well under a minute. The notebooks share a run
directory (``PPN_RUN_DIR``): ``01_fit`` writes the fit that the others read.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
FIRST = "01_fit.py"


def execute(name: str, run_dir: Path, workdir: Path) -> nbformat.NotebookNode:
    """Convert ``notebooks/<name>`` with jupytext and execute it; return the executed notebook."""
    notebook = jupytext.read(NOTEBOOKS / name)
    environment = {"PPN_SMOKE": "1", "PPN_RUN_DIR": str(run_dir), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
                   "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "2"}
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)  # the kernel inherits the test's environment
    try:
        client = nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3", allow_errors=False,
                                         resources={"metadata": {"path": str(workdir)}})
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def outputs(notebook, output_type: str) -> list:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if out.get("output_type") == output_type]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding the fit of ``01_fit``, executed once for the module."""
    run = tmp_path_factory.mktemp("notebook_run")
    notebook = execute(FIRST, run, run)
    return run, notebook


def test_notebooks_are_canonical_percent_scripts_without_outputs():
    """The .py files are what jupytext writes back (saving from Jupyter changes nothing)."""
    from jupytext.config import load_jupytext_config

    config = load_jupytext_config(str(NOTEBOOKS))
    names = sorted(p.name for p in NOTEBOOKS.glob("*.py"))
    assert names == ["01_fit.py", "02_uncertainty.py", "03_deploy.py"]
    for name in names:
        text = (NOTEBOOKS / name).read_text()
        notebook = jupytext.reads(text, fmt="py:percent")
        assert notebook.cells[0].cell_type == "markdown", name
        assert all(not cell.get("outputs") for cell in notebook.cells), name
        assert jupytext.writes(notebook, fmt="py:percent", config=config) == text, \
            f"{name} is not in canonical jupytext form: run jupytext --to py:percent {name}"
    assert "*.ipynb" in (NOTEBOOKS / ".gitignore").read_text().split()


def test_01_fit_writes_a_checkpoint(run_dir):
    run, notebook = run_dir
    assert (run / "fit" / "state.json").is_file()
    text = "".join(out.get("text", "") for out in outputs(notebook, "stream"))
    assert "smoke mode: True" in text and "size 0.30: reached" in text
    assert outputs(notebook, "display_data"), "the loss plot is shown"


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("0*.py") if p.name != FIRST))
def test_notebook_runs_in_smoke_mode(name, run_dir, tmp_path):
    run, _ = run_dir
    notebook = execute(name, run, tmp_path)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code)
    text = "".join(out.get("text", "") for out in outputs(notebook, "stream"))
    if name == "03_deploy.py":  # the sub-network checks the notebook prints
        assert "identical to the full LM's greedy decoding: True" in text
        assert (run / "deploy" / "masks.json").is_file() and (run / "deploy" / "sub_0.5" / "config.json").is_file()


def test_a_failing_cell_fails_the_run(tmp_path):
    """The runner is real: an exception in a cell surfaces as an error."""
    broken = tmp_path / "broken.py"
    broken.write_text("# %%\nx = 1\n\n# %%\nraise RuntimeError('this cell is broken')\n")
    notebook = jupytext.read(broken)
    client = nbclient.NotebookClient(notebook, timeout=60, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="this cell is broken"):
        client.execute()


def test_the_documented_headless_commands_run_a_notebook(tmp_path):
    """docs/getting-started.md runs the notebooks with ``jupytext --to ipynb`` and then
    ``jupyter-execute --inplace``: both commands exist here, write the outputs in place and
    fail with a cell that raises."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    (tmp_path / "good.py").write_text("# %%\nprint('ran', 6 * 7)\n")
    (tmp_path / "bad.py").write_text("# %%\nraise RuntimeError('this cell is broken')\n")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(*args):
        return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=300)

    converted = run("jupytext", "--to", "ipynb", "good.py", "bad.py")
    assert converted.returncode == 0, converted.stderr
    good = run("jupyter-execute", "--inplace", "--kernel_name=python3", "good.ipynb")
    assert good.returncode == 0, good.stderr
    text = "".join(out.get("text", "") for out in outputs(nbformat.read(tmp_path / "good.ipynb", as_version=4),
                                                        "stream"))
    assert text == "ran 42\n"
    bad = run("jupyter-execute", "--kernel_name=python3", "bad.ipynb")
    assert bad.returncode == 1 and "this cell is broken" in bad.stderr
