"""A clean install loads a real GGUF through the command line.

The default tests never load a GGUF, and a package missing from ``pyproject.toml`` goes
unnoticed in a venv that happens to have it (transformers needs ``accelerate`` for a
GGUF). So this test builds a new venv from the package's own requirements, the way the
README does, and runs ``ppn-bayes eval`` on SmolLM2-135M's GGUF in it. Slow: minutes of
installing; skipped without ``../shared/tools/smollm2`` or the package registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)


def test_a_fresh_install_evaluates_a_gguf_through_the_cli(tmp_path, smollm2_path):
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", venv])
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    torch_pin = _run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], env=env, timeout=1800)
    if torch_pin.returncode != 0:  # the first install: no registry, no test
        pytest.skip(f"the package registry is not reachable: {torch_pin.stderr.strip()[-300:]}")
    installed = _run([python, "-m", "pip", "install", "-q", ROOT], env=env, timeout=1800)
    assert installed.returncode == 0, installed.stderr[-2000:]

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    ppn_bayes = venv / "bin" / "ppn-bayes"
    done = _run([ppn_bayes, "eval", smollm2_path, "--data", text, "--seq-len", "32", "--limit", "2", "--json",
                 "--quiet"], env=env, cwd=tmp_path, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["kind"] == "gguf" and report["windows"] == 2 and 1 < report["ppl"] < 1e4
