"""benchmarks/jobs.py and run_job.py: the GPU job's parts as data, and the runner that reads them.

The parts themselves run in tests/test_report.py's CPU rehearsal (slow); here, what the
runner makes of the data, on the CPU in seconds."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import jobs  # noqa: E402  (benchmarks/jobs.py)
import protocol  # noqa: E402
import run_job  # noqa: E402


def _dry_run(part: str, tmp_path: Path, capsys, *, gpus: int = 2, **environ) -> list[str]:
    model = tmp_path / "model.gguf"
    model.write_text("")
    env = {"OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "MODEL": str(model), **environ}
    assert run_job.Job(env, dry_run=True, gpus=gpus).run_part(part) == 0
    return capsys.readouterr().out.splitlines()


def test_the_shell_gets_the_knobs_rec_and_common(tmp_path):
    """gpu_job.sh evaluates ``--shell``: the environment's knobs win, the defaults fill the rest,
    and COMMON is an array whose extra flags are split at spaces as the shell splits them."""
    env = {"PATH": "/usr/bin:/bin", "WORK": str(tmp_path / "w w"), "QUALITY_EXTRA": "--seq-len 64  --limit-windows 2"}
    script = (f"eval \"$({sys.executable} {ROOT / 'benchmarks' / 'run_job.py'} --shell)\"\n"
              "printf '%s\\n' \"$MODEL\" \"$RANKINGS\" \"$REC\" \"$RECORD_RECIPE\" \"${#COMMON[@]}\" \"${COMMON[@]}\"")
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == jobs.KNOBS["MODEL"]
    assert lines[1] == f"{tmp_path}/w w/rankings.json"  # a default built from a knob given
    assert lines[2] == f"{jobs.KNOBS['OUT']}/records"
    assert lines[3] == jobs.KNOBS["RECORD_RECIPE"]
    common = lines[5:]
    assert int(lines[4]) == len(common) and common[-5:] == ["--skip-done", "--seq-len", "64", "--limit-windows", "2"]
    assert common[common.index("--work-dir") + 1] == f"{tmp_path}/w w"


@pytest.mark.parametrize("part", sorted(jobs.JOBS))
def test_every_part_expands_and_runs_only_methods_of_the_registry(part, tmp_path, capsys):
    lines = _dry_run(part, tmp_path, capsys, FIT_STEPS="20")
    commands = [line for line in lines if "[gpu_job]" in line and "benchmarks/" in line]
    assert commands, f"{part} runs nothing"
    assert not [line for line in lines if "no time left" in line]
    for line in commands:
        for methods in re.findall(r"--methods (\S+)", line):
            unknown = [m for m in methods.split(",") if m not in protocol.ids(quality=True)]
            assert not unknown, f"{part} runs {unknown}, which quality.py does not know"
        assert "$" not in line and " @" not in line, f"an unexpanded name in {line}"


def test_second_gpu_steps_run_on_gpu_0_of_a_one_gpu_machine(tmp_path, capsys):
    two = [line for line in _dry_run("part6", tmp_path, capsys) if "quality.py" in line and "prepare" not in line]
    one = [line for line in _dry_run("part6", tmp_path, capsys, gpus=1) if "quality.py" in line
           and "prepare" not in line]
    assert [re.search(r"GPU (\w+)", line).group(1) for line in two] == ["0", "1"]
    assert [re.search(r"GPU (\w+)", line).group(1) for line in one] == ["0", "0"]


def test_ablations_wait_for_the_fit_of_record(tmp_path, capsys):
    """Without the fit of record's rankings (and no FIT_STEPS given) the ablations are skipped
    with a note; with its rankings they take the steps it took."""
    lines = _dry_run("part2", tmp_path, capsys)
    assert sum("the fit of record is not done" in line for line in lines) == 4
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "rankings.json").write_text('{"rankings": {"ppn_bayes": {"fit": {"steps": 137}}}}')
    (tmp_path / "work" / "best-recipe.txt").write_text("--fit-set lr_lm=1e-5\n")
    lines = _dry_run("part2", tmp_path, capsys)
    runs = [line for line in lines if "quality.py" in line and "prepare" not in line]
    assert len(runs) == 4 and all("--fit-steps 137 " in line and line.endswith("--fit-set lr_lm=1e-5 --time-budget "
                                                                               f"{line.split()[-1]}") for line in runs)


def test_a_step_runs_under_its_budget_and_logs_its_exit(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "echo.py"
    script.write_text("import sys\nprint('argv', sys.argv[1:])\nsys.exit(3)\n")
    job = run_job.Job({"OUT": str(out), "LIMIT": "200", "GPU_JOB_START": "0"}, gpus=2)
    job.start = time.time()  # the part starts now: 200 s left
    step = {"run": str(script), "args": ["--x", "$NAME"], "log": "s.log", "reserve": 10, "set": {"NAME": "a b"}}
    job.run_node(step, {}, {})
    job.run_node({**step, "reserve": 190}, {}, {})  # 10 s left: under the 30 s a step needs
    text = (out / "s.log").read_text()
    budget = int(re.search(r"\((\d+) s, GPU all\)", text).group(1))
    assert 185 <= budget <= 190  # 200 s less the reserve, less the seconds the test took
    assert f"argv ['--x', 'a b', '--time-budget', '{budget * 8 // 10}']" in text
    assert "exit 3" in text and "[gpu_job] no time left for:" in text


def test_jobs_hold_only_data():
    """jobs.py declares; run_job.py runs: no function, no import beyond __future__ in the data."""
    import ast

    tree = ast.parse((ROOT / "benchmarks" / "jobs.py").read_text())
    kinds = {type(node).__name__ for node in ast.walk(tree)}
    assert not kinds & {"FunctionDef", "Lambda", "Call", "ClassDef"}
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert [node.module for node in imports] == ["__future__"]


@pytest.mark.parametrize("environ, message", [
    ({"JOBS": "fit:1 kd:0.5"}, "unknown job kd:0.5 in JOBS: fit:SEED, fit:SEED:METHOD (a method quality.py fits), "
                                "fit:SEED:METHOD:KEY=VALUE/KEY=VALUE... (FitConfig fields), wkd:SIZE or "
                                "wkd:SIZE:width-kd-short"),
    ({"JOBS": "wkd:0.5:width"}, "unknown job wkd:0.5:width in JOBS"),
    ({"JOBS": "fit:0:ppn_bayes-short:settle_steps"}, "unknown job fit:0:ppn_bayes-short:settle_steps in JOBS"),
    ({"JOBS": "fit:0:ppn_bayes-short:settle_steps=3/settle=3"}, "unknown FitConfig field in JOBS: 'settle=3'"),
    ({"JOBS": "fit:0:ppn_bayes-short fit:0:ppn_bayes-flatt"}, "unknown fit method 'ppn_bayes-flatt' in JOBS; "
                                                             "quality.py fits: ppn_bayes ppn_bayes-flat"),
    ({"JOBS": "fit:0:width"}, "unknown fit method 'width' in JOBS"),
    ({"GPUS": "two"}, "GPUS must be a whole number of jobs at once, got 'two'"),
    ({"GPUS": "0"}, "GPUS must be a whole number of jobs at once, got '0'"),
    ({"QUEUE_MIN": "2m"}, "QUEUE_MIN must be whole seconds, got '2m'"),
])
def test_part14_refuses_a_bad_knob_before_any_work(environ, message, tmp_path):
    """part14's JOBS, GPUS and QUEUE_MIN are checked before the LM is prepared."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work"), **environ}
    bad = subprocess.run(["bash", "benchmarks/gpu_job.sh", "part14"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and message in bad.stdout
    assert not (tmp_path / "work" / "model").exists()


def test_gpu_bg_runs_a_part_in_the_background_and_brings_back_its_out_once_ended(tmp_path):
    """gpu_bg.sh starts a part of gpu_job.sh in a copy of the tree, detached, waits for it and,
    once it has ended, reports its exit status and copies its $OUT into the call's; a later call
    (the same command) does not start an ended part again. nll-out with no token NLLs ends at once
    with status 2 and a line in its log, which is what comes back."""
    bg, env = tmp_path / "bg", {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                "WORK": str(tmp_path / "work"), "BG": str(tmp_path / "bg"), "WAIT": "60"}
    first = subprocess.run(["bash", "benchmarks/gpu_bg.sh", "nll-out", "seed0"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env={**env, "OUT": str(tmp_path / "out1")})
    assert first.returncode == 0, first.stderr
    assert "starting gpu_job.sh nll-out" in first.stdout and "ended: rc 2" in first.stdout
    assert (bg / "repo" / "benchmarks" / "gpu_job.sh").is_file() and not (bg / "repo" / ".git").exists()
    assert (bg / "rc").read_text().strip() == "2"
    again = subprocess.run(["bash", "benchmarks/gpu_bg.sh", "nll-out", "seed0"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env={**env, "OUT": str(tmp_path / "out2")})
    assert "starting" not in again.stdout and "ended: rc 2" in again.stdout
    assert "no token NLLs" in (bg / "bg.log").read_text()
    bad = subprocess.run(["bash", "benchmarks/gpu_bg.sh", "part14"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**env, "OUT": str(tmp_path / "out3"), "WAIT": "soon"})
    assert bad.returncode == 2 and "WAIT must be whole seconds, got 'soon'" in bad.stdout


def test_gpu_bg_keeps_the_records_so_far_in_partial_while_it_waits_and_removes_them_on_return(tmp_path):
    """A call killed before it returns (the session's device limit) brings back $OUT/partial: the
    records and fits.tar of the running part as they were a few seconds before; a call that returns
    leaves no partial copy, whether the part has ended or not. The running part here is a script put
    where gpu_bg.sh's copy of the tree would be, which runs until the test lets it end. A part of the
    same name that another folder runs (another run on the machine) is not taken for this one's."""
    bg = tmp_path / "bg"
    for repo in (bg / "repo", tmp_path / "other"):
        (repo / "benchmarks").mkdir(parents=True)
        (repo / "benchmarks" / "gpu_job.sh").write_text(f"while [ ! -f '{tmp_path}/stop' ]; do sleep 0.2; done\n")
    other = subprocess.Popen(["bash", "benchmarks/gpu_job.sh", "part14"], cwd=tmp_path / "other")
    (bg / "out" / "records").mkdir(parents=True)
    line = '{"benchmark": "quality", "method": "ppn_bayes", "size_requested": 0.9}\n'
    (bg / "out" / "records" / "quality.jsonl").write_text(line)
    (bg / "out" / "fits.tar").write_bytes(b"tar")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "BG": str(bg)}
    try:
        killed = subprocess.run(["timeout", "-s", "KILL", "13", "bash", "benchmarks/gpu_bg.sh", "part14"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60,
                                env={**env, "OUT": str(tmp_path / "out1"), "WAIT": "60"})
        # timeout's KILL reaches its own process group, timeout included: -9, or 137 where it survives
        assert killed.returncode in (-9, 137), killed.stdout + killed.stderr
        assert (tmp_path / "out1" / "partial" / "records" / "quality.jsonl").read_text() == line
        assert (tmp_path / "out1" / "partial" / "fits.tar").read_bytes() == b"tar"
        running = subprocess.run(["bash", "benchmarks/gpu_bg.sh", "part14"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=60, env={**env, "OUT": str(tmp_path / "out2"), "WAIT": "6"})
        assert running.returncode == 0 and "still running" in running.stdout
        assert "starting" not in running.stdout  # the part of the killed call runs on
        assert not (tmp_path / "out2" / "partial").exists() and not (tmp_path / "out2" / "partial.tmp").exists()
        (tmp_path / "stop").touch()
        ended = subprocess.run(["bash", "benchmarks/gpu_bg.sh", "part14"], cwd=ROOT, capture_output=True,
                               text=True, timeout=60, env={**env, "OUT": str(tmp_path / "out3"), "WAIT": "30"})
        assert "ended: rc 0" in ended.stdout, ended.stdout
        assert (tmp_path / "out3" / "records" / "quality.jsonl").read_text() == line
        assert not (tmp_path / "out3" / "partial").exists()
    finally:
        (tmp_path / "stop").touch()
        other.wait(timeout=30)
