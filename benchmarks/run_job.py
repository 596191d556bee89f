"""Run one part of the GPU job as ``benchmarks/jobs.py`` declares it.

    python3 benchmarks/run_job.py part6            # what benchmarks/gpu_job.sh part6 runs
    python3 benchmarks/run_job.py part6 --dry-run  # the commands, with the files as they are now
    python3 benchmarks/run_job.py --prepare        # only convert and cache the model and tokens
    eval "$(python3 benchmarks/run_job.py --shell)"  # the knobs and COMMON as shell variables

Steps write their output to ``$OUT/<log>``; the records go to ``$OUT/records/`` (the
scripts' ``--records-dir``). A part never stops at a failed step: the step's exit status is
logged and the next one runs (every script keeps what it measured). The part's clock starts
at ``GPU_JOB_START`` (seconds since the epoch, set by gpu_job.sh) or when this starts.
Standard library only: it runs before anything is installed on the GPU machine.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jobs import JOBS, KNOBS, TEMPLATES, VALUES  # noqa: E402

MIN_BUDGET = 30  # seconds: a step with less is not started
_NAME = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


class Job:
    """One part's knobs, clock and logs."""

    def __init__(self, environ: dict[str, str] | None = None, *, dry_run: bool = False, gpus: int | None = None):
        self.environ = dict(os.environ if environ is None else environ)
        self.knobs: dict[str, str] = {}
        for name, default in KNOBS.items():
            given = self.environ.get(name)
            self.knobs[name] = given if given else self.expand_word(default, {})
        self.start = float(self.environ.get("GPU_JOB_START") or time.time())
        self.dry_run = dry_run
        self._gpus = gpus
        self._lock = threading.Lock()

    # -- words ---------------------------------------------------------------------------------------------
    def value(self, name: str, local: dict) -> list[str]:
        """The words of a value, a knob (split at spaces) or a local name."""
        if name in local:
            return [local[name]]
        if name in self.knobs:
            return self.knobs[name].split()
        if name not in VALUES:
            raise KeyError(f"jobs.py names ${name}, which is no knob, value or name set by the step")
        spec = VALUES[name]
        if "words" in spec:
            return self.expand(spec["words"], local)
        if "file_words" in spec:
            path = Path(self.expand_word(spec["file_words"], local))
            text = path.read_text() if path.is_file() else self.expand_word(spec["default"], local)
            return text.split()
        if "json" in spec:
            try:
                data = json.loads(Path(self.expand_word(spec["json"], local)).read_text())
                for key in spec["keys"]:
                    data = data[key]
                return [str(data)]
            except (OSError, ValueError, KeyError, TypeError):
                return [self.expand_word(spec["default"], local)]
        for condition, words in spec["first"]:
            if self.holds(condition, local):
                return self.expand(words, local)
        return []

    def expand_word(self, word: str, local: dict) -> str:
        """``word`` with each ``$NAME``: a local name or a knob as it is, a value's words joined by spaces."""
        def one(match) -> str:
            name = match.group(1) or match.group(2)
            if name in local:
                return local[name]
            return self.knobs[name] if name in self.knobs else " ".join(self.value(name, local))

        return _NAME.sub(one, word)

    def expand(self, words: list[str], local: dict) -> list[str]:
        """``words`` with ``$NAME`` replaced and each ``@NAME`` spliced in."""
        out = []
        for word in words:
            if word.startswith("@"):
                out += self.value(word[1:], local)
            else:
                out.append(self.expand_word(word, local))
        return out

    def holds(self, condition, local: dict) -> bool:
        if condition is True:
            return True
        if "exists" in condition:
            return all(Path(self.expand_word(p, local)).exists() for p in condition["exists"])
        if "given" in condition:
            return bool(self.environ.get(condition["given"]))
        return any(self.holds(c, local) for c in condition["any"])

    # -- time, GPUs, logs ------------------------------------------------------------------------------------
    def left(self) -> int:
        return int(self.knobs["LIMIT"]) - int(time.time() - self.start)

    def gpus(self) -> int:
        """GPUs of the machine (2 off CUDA, where the job's two GPUs are only names)."""
        if self._gpus is None:
            if self.knobs["DEVICE"] != "cuda":
                self._gpus = 2
            else:
                try:
                    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
                except FileNotFoundError:
                    listed = ""
                self._gpus = len(listed.splitlines())
        return self._gpus

    def gpu(self, gpu) -> str:
        return str(1 if self.gpus() >= 2 else 0) if gpu == "second" else str(gpu)

    def log(self, name: str, line: str) -> None:
        if self.dry_run:
            print(f"{name}: {line}")
            return
        with self._lock, open(Path(self.knobs["OUT"]) / name, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    # -- running -----------------------------------------------------------------------------------------------
    def run_node(self, node: dict, env: dict, local: dict) -> None:
        """``node`` once, or once for each item of its ``each``."""
        for names in self.repeats(node, local):
            self.run_one(node, env, names)

    def repeats(self, node: dict, local: dict) -> list[dict]:
        """The names of each run of ``node``: ``local`` with its ``set``, and each item of its ``each``."""
        local = {**local, **node.get("set", {})}
        each = node.get("each")
        if each is None:
            return [local]
        items = self.knobs[each["items"]].split() if isinstance(each["items"], str) else each["items"]
        return [{**local, **dict(zip(each["as"], item.split(each.get("sep", " ")), strict=True))} for item in items]

    def run_one(self, node: dict, env: dict, local: dict) -> None:
        """A step, or steps in order or together, under ``CUDA_VISIBLE_DEVICES`` of its ``gpu``."""
        if "gpu" in node:
            env = {**env, "CUDA_VISIBLE_DEVICES": self.gpu(node["gpu"])}
        if "steps" in node:
            for child in node["steps"]:
                self.run_node(child, env, local)
        elif "together" in node:
            runs = [(child, names) for child in node["together"] for names in self.repeats(child, local)]
            if (node.get("in_turn_on_one_gpu") and self.gpus() < 2) or self.dry_run:
                for child, names in runs:
                    self.run_one(child, env, names)
                return
            threads = [threading.Thread(target=self.run_one, args=(child, env, names)) for child, names in runs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        elif "copy" in node:
            self.copy(node, local)
        else:
            self.run_step(node, env, local)

    def run_step(self, node: dict, env: dict, local: dict) -> None:
        """``python3 SCRIPT ARGS`` under ``timeout`` at the part's time left less the step's reserve."""
        step = node
        if "use" in node:
            template = TEMPLATES[node["use"]]
            step = {**template, **node, "args": [word for w in template["args"]
                                                 for word in (node.get("args", []) if w == "@ARGS" else [w])]}
        log = self.expand_word(step["log"], local)
        if "when" in step and not self.holds(step["when"], local):
            if "skip_note" in step:
                self.log(log, self.expand_word(step["skip_note"], local))
            return
        if "note" in step:
            self.log(log, self.expand_word(step["note"], local))
        command = [step["run"], *self.expand(step["args"], local)]
        prefix: list[str] = []
        if step.get("timeout", True):
            budget = self.left() - step["reserve"]
            if budget < MIN_BUDGET:
                self.log(log, f"[gpu_job] no time left for: {shlex.join(command)}")
                return
            prefix = ["timeout", "--signal=TERM", f"{budget}s"]
            if step.get("time_budget", True):
                command += ["--time-budget", str(budget * 8 // 10)]
            self.log(log, f"[gpu_job] {time.strftime('%H:%M:%S')} ({budget} s, GPU "
                          f"{env.get('CUDA_VISIBLE_DEVICES', 'all')}): {shlex.join(command)}")
        else:
            self.log(log, f"[gpu_job] {time.strftime('%H:%M:%S')}: {shlex.join(command)}")
        if self.dry_run:
            return
        with open(Path(self.knobs["OUT"]) / log, "a", encoding="utf-8") as handle:
            code = subprocess.run([*prefix, sys.executable, *command], stdout=handle, stderr=subprocess.STDOUT,
                                  env=env).returncode
        self.log(log, f"[gpu_job] {time.strftime('%H:%M:%S')} exit {code}")

    def copy(self, node: dict, local: dict) -> None:
        target = Path(self.expand_word(node["to"], local))
        sources = sorted(glob.glob(self.expand_word(node["copy"], local)))
        if self.dry_run:
            print(f"copy {len(sources)} files to {target}")
            return
        target.mkdir(parents=True, exist_ok=True)
        for source in sources:
            shutil.copy2(source, target)

    def prepare(self) -> int:
        """GGUF -> Hugging Face directory, and the tokens, cached under $WORK (~1 min, once)."""
        model = self.knobs["MODEL"]
        if not Path(model).exists():
            print(f"no model at {model}: stage it first (../shared/tools/device-stage)")
            return 2
        command = [sys.executable, "benchmarks/quality.py", *self.value("COMMON", {}), "--prepare"]
        if self.dry_run:
            print(f"prepare.log: {shlex.join(command[1:])}")
            return 0
        log = Path(self.knobs["OUT"]) / "prepare.log"
        with open(log, "w", encoding="utf-8") as handle:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
        if code != 0:
            print(log.read_text(), end="")
            return 2
        return 0

    def run_part(self, part: str) -> int:
        if part not in JOBS:
            raise SystemExit(f"unknown part {part!r}: one of {', '.join(JOBS)}")
        if not self.dry_run:
            Path(self.value("REC", {})[0]).mkdir(parents=True, exist_ok=True)
            Path(self.knobs["WORK"]).mkdir(parents=True, exist_ok=True)
        job = JOBS[part]
        if job["prepare"] and (code := self.prepare()):
            return code
        env = {**self.environ, "PYTHONUNBUFFERED": "1"}
        for node in job["steps"]:
            self.run_node(node, env, {})
        return 0

    def shell(self) -> str:
        """The knobs, ``REC`` and ``COMMON`` as shell assignments (an array for COMMON), for gpu_job.sh."""
        lines = [f"{name}={shlex.quote(value)}" for name, value in self.knobs.items()]
        lines.append(f"REC={shlex.quote(self.value('REC', {})[0])}")
        lines.append(f"COMMON=({shlex.join(self.value('COMMON', {}))})")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parts = ", ".join(f"{name}: {job['doc']}" for name, job in JOBS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=f"Parts. {parts}")
    p.add_argument("part", nargs="?", help=f"the part to run: {', '.join(JOBS)}")
    p.add_argument("--dry-run", action="store_true", help="print the commands and log lines, run nothing")
    p.add_argument("--prepare", action="store_true", help="only cache the model and tokens under $WORK")
    p.add_argument("--shell", action="store_true", help="print the knobs, REC and COMMON as shell assignments")
    p.add_argument("--gpus", type=int, default=None,
                   help="the machine's GPUs (default: nvidia-smi -L's count on CUDA, 2 elsewhere)")
    args = p.parse_args(argv)
    job = Job(dry_run=args.dry_run, gpus=args.gpus)
    if args.shell:
        print(job.shell())
        return 0
    if args.prepare:
        return job.prepare()
    if args.part is None:
        p.error("give a part, --prepare or --shell")
    return job.run_part(args.part)


if __name__ == "__main__":
    sys.exit(main())
