"""Teacher-text speed: tokens per second of sampling the LM's continuations of corpus prompts.

What ``ppn-bayes teacher-text`` does, measured: rounds of ``batch`` sequences, each a
``--prompt-len`` window of the corpus at a seeded offset continued by ``--new-tokens``
tokens sampled at ``--temperature`` from the ``--top-k`` most likely (and the ``--top-p``
nucleus among them, when given) with :class:`ppn_bayes.generation.Decoder` (static KV
cache); each round's tokens are checked by the degenerate-sample guard
(:func:`ppn_bayes.generation.distinct_ngram_fraction`, 4-grams) and copied to the host,
as the command does before writing them.

A plan is a list of ``SETTING@BATCH`` entries, measured in order:

* ``grouped-compiled``: grouped attention (keys and values read in place), the decode
  step with its sampling compiled (``torch.compile``; on CUDA ``mode="reduce-overhead"``:
  one CUDA graph replay a token);
* ``grouped-eager``: grouped attention, no compilation;
* ``own-eager``, ``own-compiled``: the LM's own attention implementation (``sdpa`` as
  loaded), which copies the key/value groups to every query head over the whole cache;
* ``grouped-compiled-blocks``: ``grouped-compiled`` attending only to the cache up to the
  next multiple of ``--cache-block`` positions (``Decoder(cache_block=...)``): less to
  read, one compiled graph per block.

Compiled settings run one untimed generation first (compiling and capturing; its wall time
is ``compile_seconds``), then ``--rounds`` timed rounds; eager settings run a short untimed
warm-up and ``--eager-rounds`` timed rounds. The device is synchronised before every clock
read; ``tokens_per_s`` counts generated tokens (``batch x new_tokens`` a round, prefill
included in the time), ``written_tokens_per_s`` the prompt tokens too (what the token store
receives). A record is appended to ``<records-dir>/teacher.jsonl`` as soon as its
configuration is measured; no configuration starts after ``--time-budget`` seconds.

ppn_bayes's package ``__init__`` imports pyro, which the GPU machine's image lacks: this
script then loads only the modules it needs (generation, lm, records; none imports pyro
or arviz).

Example (one H200)::

    PYTHONPATH=$PWD python benchmarks/teacher_speed.py --gguf /root/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --corpus .device/b/wiki_summaries_en.txt --records-dir /tmp/out/records
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import re
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

SETTINGS = ("grouped-compiled", "grouped-compiled-blocks", "grouped-eager", "own-eager", "own-compiled")
GPU_PLAN = ("grouped-compiled@2048", "grouped-compiled@4096", "own-eager@1024", "grouped-eager@1024",
            "grouped-compiled-blocks@4096", "grouped-compiled@1024")
CPU_PLAN = ("grouped-eager@4", "own-eager@4")


def _modules():
    """``(generation, lm, records)`` of ppn_bayes; without the package's ``__init__`` (and
    so without pyro) where pyro is not installed."""
    try:
        pyro = importlib.util.find_spec("pyro")
    except (ImportError, ValueError):
        pyro = None
    if "ppn_bayes" not in sys.modules and pyro is None:
        spec = importlib.util.find_spec("ppn_bayes")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("ppn_bayes is not importable: put the repository root on PYTHONPATH")
        package = types.ModuleType("ppn_bayes")
        package.__path__ = list(spec.submodule_search_locations)
        version = re.search(r'__version__ = "([^"]+)"', Path(spec.origin).read_text())
        package.__version__ = version.group(1) if version else "unknown"
        sys.modules["ppn_bayes"] = package
    from ppn_bayes import lm, records
    from ppn_bayes.decode import generation

    return generation, lm, records


@dataclass(frozen=True)
class Entry:
    """One configuration of the plan."""

    setting: str
    batch: int

    @classmethod
    def parse(cls, text: str) -> "Entry":
        setting, at, batch = text.strip().partition("@")
        if setting not in SETTINGS or not at or not batch.isdigit() or int(batch) < 1:
            raise ValueError(f"a plan entry is SETTING@BATCH with SETTING one of {SETTINGS}, got {text!r}")
        return cls(setting, int(batch))

    @property
    def compiled(self) -> bool:
        return "-compiled" in self.setting

    @property
    def blocks(self) -> bool:
        return self.setting.endswith("-blocks")

    @property
    def grouped(self) -> bool:
        return self.setting.startswith("grouped")


@dataclass(frozen=True)
class TeacherSpeedConfig:
    """What one run measures."""

    model: str
    corpus: str
    plan: tuple[Entry, ...]
    device: str = "cpu"
    dtype: str = "float32"
    prompt_len: int = 32
    new_tokens: int = 224
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    rounds: int = 4
    eager_rounds: int = 1
    compile_backend: str = "inductor"
    compile_mode: str | None = "reduce-overhead"
    cache_block: int = 64
    corpus_chars: int = 4_000_000
    seed: int = 0
    time_budget: float | None = None
    records_dir: str = "docs/benchmarks/records"
    model_name: str | None = None
    quick: bool = False
    sample_chars: int = 400

    def __post_init__(self):
        for name in ("prompt_len", "new_tokens", "rounds", "eager_rounds", "corpus_chars", "cache_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not self.plan:
            raise ValueError("the plan is empty: give at least one SETTING@BATCH")
        if not Path(self.corpus).is_file():
            raise FileNotFoundError(f"no corpus text at {self.corpus}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive (teacher text is sampled), got {self.temperature}")
        _modules()[0].check_sampling(self.temperature, self.top_k, self.top_p)

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model).name.split(".")[0]


def _free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@torch.no_grad()
def measure(lm, corpus: torch.Tensor, entry: Entry, config: TeacherSpeedConfig, generation) -> dict:
    """Build the decoder of ``entry``, warm it up, time its rounds; the figures."""
    device = torch.device(config.device)
    B, P, N = entry.batch, config.prompt_len, config.new_tokens
    # P + N positions (one more than the generation writes), as teacher_tokens allocates: a
    # cache length that is a multiple of 8 keeps the bf16 matrix products aligned.
    decoder = generation.Decoder(lm, max_len=P + N, batch_size=B, compile=entry.compiled,
                                 compile_backend=config.compile_backend, compile_mode=config.compile_mode,
                                 grouped_attention=entry.grouped,
                                 cache_block=config.cache_block if entry.blocks else None)
    offsets = torch.Generator().manual_seed(config.seed)
    sampler = torch.Generator(device=device).manual_seed(config.seed)
    window = torch.arange(P)
    sampling = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, generator=sampler)

    def prompts() -> torch.Tensor:
        starts = torch.randint(0, corpus.numel() - P + 1, (B,), generator=offsets)
        return corpus[starts[:, None] + window]  # [B, P]

    began = time.perf_counter()
    warm = N if entry.compiled else min(N, 8)  # compiling and capturing need the whole loop
    decoder.generate(prompts().to(device), warm, **sampling)
    generation.synchronize(device)
    compile_seconds = time.perf_counter() - began
    rounds = config.rounds if entry.compiled else config.eager_rounds
    seconds = prefill = 0.0
    distinct, sample = [], None
    for _ in range(rounds):
        batch = prompts()
        generation.synchronize(device)
        start = time.perf_counter()
        new, prefill_seconds, _ = decoder._generate(batch.to(device), N, **sampling)  # [B, N]
        distinct.append(generation.distinct_ngram_fraction(new, 4))  # [B]: the guard, on the device
        new = new.cpu()
        generation.synchronize(device)
        seconds += time.perf_counter() - start
        prefill += prefill_seconds
        if sample is None:
            sample = torch.cat([batch[0], new[0]])  # [P + N]
    distinct = torch.cat(distinct).float().cpu()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del decoder
    return {
        "tokens_per_s": rounds * B * N / seconds,
        "written_tokens_per_s": rounds * B * (P + N) / seconds,
        "decode_tokens_per_s": rounds * B * (N - 1) / (seconds - prefill) if N > 1 else None,
        "seconds": seconds, "prefill_seconds": prefill, "compile_seconds": compile_seconds, "rounds": rounds,
        "peak_mem_bytes": peak, "peak_mem_gb": peak / 2 ** 30 if peak is not None else None,
        "distinct_4gram_mean": float(distinct.mean()),
        "distinct_4gram_below_0.5": float((distinct < 0.5).float().mean()),
        "sample_ids": sample.tolist(),
    }


def run_teacher_speed(config: TeacherSpeedConfig) -> list[dict]:
    """Measure every entry of the plan in order, appending a record after each."""
    generation, lm_module, records_module = _modules()
    began = time.perf_counter()
    device = torch.device(config.device)
    dtype = getattr(torch, config.dtype)
    lm, tokenizer = lm_module.load_lm(config.model)
    lm = lm.to(device=device, dtype=dtype).eval()
    attention = lm.config._attn_implementation
    text = Path(config.corpus).read_text(encoding="utf-8")[: config.corpus_chars]
    corpus = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)  # [M]
    if corpus.numel() < config.prompt_len:
        raise ValueError(f"the corpus gives {corpus.numel()} tokens, fewer than one prompt of {config.prompt_len}")
    generation._raise_recompile_limit(256)
    print(f"[teacher] {config.name} on {records_module.machine()}, {config.dtype}, corpus {corpus.numel()} tokens, "
          f"attention as loaded: {attention}", flush=True)
    out = []
    for entry in config.plan:
        if config.time_budget is not None and time.perf_counter() - began > config.time_budget:
            print(f"[teacher] out of time: {entry.setting}@{entry.batch} skipped", flush=True)
            continue
        _free(device)
        try:
            figures = measure(lm, corpus, entry, config, generation)
        except torch.OutOfMemoryError as err:  # pragma: no cover - GPU only
            print(f"[teacher] {entry.setting}@{entry.batch}: out of memory ({err})", flush=True)
            continue
        sample = tokenizer.decode(figures.pop("sample_ids"))[: config.sample_chars]
        record = records_module.append_record(
            "teacher", method=entry.setting, model=config.name, records_dir=config.records_dir,
            batch=entry.batch, prompt_len=config.prompt_len, new_tokens=config.new_tokens,
            temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, dtype=config.dtype,
            device=str(device), compiled=entry.compiled, grouped_attention=entry.grouped,
            cache_block=config.cache_block if entry.blocks else None,
            attention=generation.GROUPED_ATTENTION if entry.grouped else attention,
            compile_backend=config.compile_backend if entry.compiled else None,
            compile_mode=config.compile_mode if entry.compiled and config.compile_backend == "inductor" else None,
            quick=config.quick, sample_text=sample, **figures,
        )
        out.append(record)
        peak = f", peak {record['peak_mem_gb']:.1f} GiB" if record["peak_mem_gb"] is not None else ""
        print(f"[teacher] {entry.setting:16s} batch {entry.batch:5d}: {record['tokens_per_s']:12.1f} tokens/s "
              f"({record['written_tokens_per_s']:.1f} written; compile {record['compile_seconds']:.1f} s{peak}; "
              f"distinct 4-grams {record['distinct_4gram_mean']:.3f})", flush=True)
        print(f"[teacher]   sample: {sample!r}", flush=True)
    _free(device)
    return out


# -- command line ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (every one documented)."""
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--gguf", "--model", dest="model", required=True,
                   help="the LM: a .gguf file or a Hugging Face directory")
    p.add_argument("--corpus", required=True, help="text whose windows are the prompts")
    p.add_argument("--plan", default=None,
                   help=f"SETTING@BATCH entries, comma-separated, measured in order; settings {SETTINGS} "
                        f"(default on CUDA: {','.join(GPU_PLAN)}; on CPU: {','.join(CPU_PLAN)})")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="torch device (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens a sequence (default: 32)")
    p.add_argument("--new-tokens", type=int, default=224, help="sampled tokens a sequence (default: 224)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0: all (default: 50)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus among the top-k (default: none)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds of a compiled setting (default: 4)")
    p.add_argument("--eager-rounds", type=int, default=1, help="timed rounds of an eager setting (default: 1)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default: inductor; 'aot_eager' traces without code generation)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode with inductor (default: reduce-overhead, CUDA graphs); 'none' for none")
    p.add_argument("--cache-block", type=int, default=64,
                   help="block of cache positions of the -blocks settings (default: 64)")
    p.add_argument("--corpus-chars", type=int, default=4_000_000,
                   help="characters of the corpus tokenised for prompts (default: 4,000,000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt offsets and of the sampler (default: 0)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no new configuration starts (default: none)")
    p.add_argument("--records-dir", default="docs/benchmarks/records",
                   help="where teacher.jsonl goes (default: docs/benchmarks/records)")
    p.add_argument("--model-name", default=None, help="model name in the records (default: from the file name)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: prompts of 8, 8 new tokens, 1 round each (the records say quick)")
    return p


def config_from(args: argparse.Namespace) -> TeacherSpeedConfig:
    """A :class:`TeacherSpeedConfig` from parsed flags."""
    cuda = torch.device(args.device).type == "cuda"
    plan = args.plan.split(",") if args.plan else (GPU_PLAN if cuda else CPU_PLAN)
    quick = args.quick
    return TeacherSpeedConfig(
        model=args.model, corpus=args.corpus, plan=tuple(Entry.parse(e) for e in plan if e.strip()),
        device=args.device, dtype=args.dtype or ("bfloat16" if cuda else "float32"),
        prompt_len=8 if quick else args.prompt_len, new_tokens=8 if quick else args.new_tokens,
        temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
        rounds=1 if quick else args.rounds, eager_rounds=1 if quick else args.eager_rounds,
        compile_backend=args.compile_backend,
        compile_mode=None if args.compile_mode == "none" else args.compile_mode, cache_block=args.cache_block,
        corpus_chars=args.corpus_chars, seed=args.seed, time_budget=args.time_budget,
        records_dir=args.records_dir, model_name=args.model_name, quick=quick,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse flags, build the configuration, run."""
    config = config_from(build_parser().parse_args(argv))
    records = run_teacher_speed(config)
    print(f"[teacher] {len(records)} records appended to {Path(config.records_dir) / 'teacher.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
