"""Speed benchmark: tokens per second of sub-networks against the dense LM, in one run.

The protocol of BENCHMARKS.md:

* GPU (H200, bf16, ``torch.compile``, static KV cache): prefill tokens/s at batch
  16 x 2048, and decode tokens/s at batch 1 (32-token prompt, 256 new tokens, greedy);
* CPU (float32, 2 threads): decode tokens/s at batch 1;
* unstructured sparse models run as dense matrices with zeros (how they deploy today):
  one is measured to show that it runs at the dense model's speed.

Each model is measured in the same process as the dense model, which is measured first;
``ratio_vs_dense`` divides by that. Decoding uses :class:`ppn_bayes.generation.Decoder`
(a static cache, the fixed-shape decode step compiled as a CUDA graph on a GPU); prefill
is the decoder's own forward over the prompt, compiled once per model with
``dynamic=False``. Compile and warm-up time is excluded from the timings and recorded
as ``compile_seconds``; the device is synchronised before every clock read.

Sub-networks are cut from ``--model`` by a ranking in a rankings file written by
``benchmarks/quality.py`` (no pyro needed here). Their speed depends on their shapes, not
on the values of their weights, so the CPU run may slice the dense GGUF model with the
ranking fitted on the GPU; the records say which weights were used.

Example (CPU, this machine)::

    python benchmarks/speed.py --model "$(../shared/tools/smollm2)" --rankings rankings.json \\
        --device cpu --phases decode
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ppn_bayes.core.architecture import Architecture, describe
from ppn_bayes.io import FileFormatError, read_json
from ppn_bayes.core.ranking import Ranking
from ppn_bayes.records import RECORDS_DIR, append_record

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import PROTOCOL_SIZES, RECORD, listed  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@dataclass(frozen=True)
class SpeedConfig:
    """What one run of the speed benchmark measures."""

    model: str
    rankings: str | None = None
    method: str = RECORD
    sizes: tuple[float, ...] = PROTOCOL_SIZES
    phases: tuple[str, ...] = ("prefill", "decode")
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    prefill_batch: int = 16
    prefill_len: int = 2048
    prompt_len: int = 32
    new_tokens: int = 256
    repeats: int = 3
    threads: int | None = None
    prompt_text: str | None = None
    sparse_weights: str | None = None
    sparse_label: str = "sparsegpt@0.5"
    sparse_zeros: float | None = None
    records_dir: str = str(RECORDS_DIR)
    model_name: str | None = None
    weights: str = "the model's own"
    time_budget: float | None = None
    quick: bool = False

    def __post_init__(self):
        for phase in self.phases:
            if phase not in ("prefill", "decode"):
                raise ValueError(f"phases are 'prefill' and 'decode', got {phase!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        for name in ("prefill_batch", "prefill_len", "prompt_len", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.sparse_zeros is not None and not 0 < self.sparse_zeros < 1:
            raise ValueError(f"--sparse-zeros is a kept fraction in (0, 1), got {self.sparse_zeros}")

    @property
    def name(self) -> str:
        """The model's name in records."""
        return self.model_name or Path(self.model).name.split(".")[0]


# -- inputs --------------------------------------------------------------------------------------
def read_rankings(path: str | Path) -> dict[str, dict]:
    """The entries of a rankings file (the ``rankings.json`` that ``quality.py --rankings``
    writes: model, architecture, ranking, fit settings, training tokens), by method;
    ``FileFormatError`` naming the file when it is not one."""
    data = read_json(path, "rankings file")
    if data.get("format") != "ppn_bayes.rankings" or not isinstance(data.get("rankings", {}), dict):
        raise FileFormatError(f"{path} is not a rankings file written by benchmarks/quality.py")
    return data.get("rankings", {})


def ranking_of(path: str | Path, method: str, entry: dict, arch: Architecture | None = None) -> Ranking:
    """The ranking of one entry of :func:`read_rankings` on ``arch`` (default: the entry's own
    architecture); ``FileFormatError`` naming the file and the method when it is invalid."""
    try:
        return Ranking.from_dict(arch if arch is not None else Architecture.from_dict(entry["architecture"]), entry)
    except (KeyError, TypeError, ValueError) as err:
        raise FileFormatError(f"the {method} ranking in {path} is invalid: {err}") from None


def load_ranking(path: str | Path, method: str, lm) -> Ranking:
    """``method``'s ranking from a rankings file, checked against ``lm``'s architecture."""
    rankings = read_rankings(path)
    if method not in rankings:
        raise FileFormatError(f"{path} has no ranking for {method!r}; it has {sorted(rankings)}")
    entry = rankings[method]
    saved = Architecture.from_dict(entry["architecture"])
    arch = describe(lm, mlp_group=saved.mlp_group)
    if saved != arch:
        raise FileFormatError(f"the {method} ranking in {path} is for another model (its architecture differs)")
    return ranking_of(path, method, entry, arch)


def prompt_tokens(config: SpeedConfig, tokenizer, vocab_size: int, n: int) -> torch.Tensor:
    """``n`` tokens of running text (the start of ``prompt_text``), else seeded random ids."""
    if config.prompt_text and Path(config.prompt_text).is_file() and tokenizer is not None:
        text = Path(config.prompt_text).read_text(encoding="utf-8")[: 12 * n + 1000]
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= n:
            return torch.tensor(ids[:n], dtype=torch.long)
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(0))


def _sync(device: torch.device) -> None:
    from ppn_bayes.decode.generation import synchronize

    synchronize(device)


# -- measurements ------------------------------------------------------------------------------------
def measure_prefill(lm, config: SpeedConfig, tokens: torch.Tensor) -> dict:
    """Prefill tokens/s at ``prefill_batch x prefill_len`` through the decoder's static cache."""
    from ppn_bayes.decode.generation import Decoder

    B, T = config.prefill_batch, config.prefill_len
    input_ids = tokens[: B * T].view(B, T).to(config.device)  # [B, T]
    decoder = Decoder(lm, max_len=T, batch_size=B)
    decoder.prefill(input_ids)  # eager: allocates the cache at fixed addresses
    slots = torch.arange(T, device=decoder.device)
    forward = decoder._forward  # the decoder's own forward over the cache, as it compiles it
    if config.compile:
        forward = torch.compile(forward, fullgraph=True, dynamic=False)
    device = torch.device(config.device)
    began = time.perf_counter()
    with torch.no_grad():
        for _ in range(2):  # compile and warm up
            forward(input_ids, slots, True)
        _sync(device)
        compile_seconds = time.perf_counter() - began
        times = []
        for _ in range(config.repeats):
            _sync(device)
            start = time.perf_counter()
            forward(input_ids, slots, True)
            _sync(device)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"tokens_per_s": B * T / seconds, "seconds": seconds, "times": times,
            "compile_seconds": compile_seconds, "batch": B, "seq_len": T, "new_tokens": 0}


def measure_decode(lm, config: SpeedConfig, tokens: torch.Tensor) -> dict:
    """Greedy decode tokens/s at batch 1: ``prompt_len`` prompt, ``new_tokens`` new tokens;
    the median of ``repeats`` timed generations after one untimed (compiling) one."""
    from ppn_bayes.decode.generation import Decoder, timed_generate

    prompt = tokens[: config.prompt_len][None, :].to(config.device)  # [1, P]
    decoder = Decoder(lm, max_len=config.prompt_len + config.new_tokens, batch_size=1, compile=config.compile)
    began = time.perf_counter()
    timed_generate(decoder, prompt, config.new_tokens, warmup=1)  # compiles (and is discarded)
    compile_seconds = time.perf_counter() - began
    runs = [timed_generate(decoder, prompt, config.new_tokens, warmup=0) for _ in range(config.repeats)]
    rates = [r.decode_tokens_per_s for r in runs]
    return {"tokens_per_s": statistics.median(rates), "rates": rates,
            "tokens_per_s_with_prefill": statistics.median(r.tokens_per_s for r in runs),
            "compile_seconds": compile_seconds, "batch": 1, "seq_len": config.prompt_len,
            "new_tokens": config.new_tokens, "output": runs[0].tokens[0, :16].tolist()}


# -- the models ------------------------------------------------------------------------------------
def zero_smallest(lm, keep: float) -> None:
    """Zero the ``1 - keep`` smallest-magnitude weights of every decoder Linear (dense
    matrices with zeros: an unstructured sparse model as it deploys)."""
    from ppn_bayes.core.architecture import decoder_layers

    with torch.no_grad():
        for module in decoder_layers(lm).modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                k = int(w.numel() * (1 - keep))
                if k:
                    threshold = w.abs().flatten().float().kthvalue(k).values
                    w.masked_fill_(w.abs() <= threshold, 0)


def models(config: SpeedConfig, lm, arch: Architecture):
    """``(method, size_requested, size_reached, params_kept, build)`` for each model to time;
    ``build()`` returns the model on the device in the benchmark's dtype."""
    from ppn_bayes.deploy.subnetwork import build_subnetwork, held_params

    dtype = getattr(torch, config.dtype)
    yield "dense", 1.0, 1.0, arch.total_cost, lambda: lm.to(config.device, dtype)
    if config.rankings is not None:
        ranking = load_ranking(config.rankings, config.method, lm)
        for size in config.sizes:
            masks = ranking.masks(size)

            def build(masks=masks):
                sub = build_subnetwork(lm, masks).to(config.device, dtype)
                held_params(sub, masks)  # its parameters are its masks', less the idle layers' norms
                return sub

            yield config.method, size, masks.size_reached, masks.kept_params, build
    if config.sparse_weights or config.sparse_zeros:
        from ppn_bayes.inspect.baselines import decoder_density

        def build_sparse():
            import copy

            sparse = copy.deepcopy(lm)
            if config.sparse_weights:
                from safetensors.torch import load_model

                load_model(sparse, config.sparse_weights, strict=False)
            else:
                zero_smallest(sparse, config.sparse_zeros)
            return sparse.to(config.device, dtype)

        label = config.sparse_label if config.sparse_weights else f"magnitude-zeros@{config.sparse_zeros}"
        method, _, size = label.partition("@")
        probe = build_sparse()
        reached = decoder_density(probe, arch)
        del probe
        yield method, float(size or 0.5), reached, None, build_sparse


def run_speed(config: SpeedConfig) -> list[dict]:
    """Measure the dense model, then every sub-network (and the sparse model), per phase."""
    from ppn_bayes.decode.generation import _raise_recompile_limit
    from ppn_bayes.lm import load_lm

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    began = time.perf_counter()
    lm, tokenizer = load_lm(config.model)
    lm = lm.float().eval()
    arch = describe(lm)
    tokens = prompt_tokens(config, tokenizer, lm.config.vocab_size,
                           max(config.prefill_batch * config.prefill_len, config.prompt_len))
    if tokens.numel() < config.prefill_batch * config.prefill_len and "prefill" in config.phases:
        tokens = tokens.repeat(config.prefill_batch * config.prefill_len // tokens.numel() + 1)
    _raise_recompile_limit(256)
    records = []
    dense_rate: dict[str, float] = {}
    for method, size, reached, kept, build in models(config, lm, arch):
        if config.time_budget is not None and time.perf_counter() - began > config.time_budget:
            print(f"[speed] out of time: {method} at {size} skipped", flush=True)
            continue
        model = build()
        for phase in config.phases:
            torch._dynamo.reset()  # a fresh compile cache for every model
            measure = measure_prefill if phase == "prefill" else measure_decode
            figures = measure(model, config, tokens)
            rate = figures.pop("tokens_per_s")
            if method == "dense":
                dense_rate[phase] = rate
            ratio = rate / dense_rate[phase] if phase in dense_rate else None
            record = append_record(
                "speed", method=method, model=config.name, records_dir=config.records_dir,
                size_requested=size, size_reached=reached, params_kept=kept, phase=phase,
                tokens_per_s=rate, ratio_vs_dense=ratio, batch=figures.pop("batch"),
                seq_len=figures.pop("seq_len"), new_tokens=figures.pop("new_tokens"), dtype=config.dtype,
                compiled=config.compile, quick=config.quick,
                settings={"weights": config.weights, "threads": torch.get_num_threads(),
                          "repeats": config.repeats, "decoder": "ppn_bayes.generation.Decoder (static KV cache)",
                          "compile_mode": ("reduce-overhead" if phase == "decode" else "default")
                          if config.compile else None, **figures},
            )
            records.append(record)
            print(f"[speed] {phase:7s} {method:14s} size {size:.2f}: {rate:12.1f} tokens/s"
                  + (f"  x{ratio:.3f} dense" if ratio else ""), flush=True)
        if method != "dense":
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return records


# -- command line -------------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.replace(",", " ").split())


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (every one documented)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True,
                   help="the LM: a .gguf file or a Hugging Face directory (e.g. a fit checkpoint's lm/)")
    p.add_argument("--rankings", default=None, help="rankings file written by benchmarks/quality.py")
    p.add_argument("--method", default=RECORD, help=f"which ranking of the file to cut (default: {RECORD})")
    p.add_argument("--sizes", type=_floats, default=PROTOCOL_SIZES, help=f"sizes (default: {listed(PROTOCOL_SIZES)})")
    p.add_argument("--phases", default="prefill,decode",
                   help="prefill, decode or both, comma-separated (default: both)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the prefill and the decode step (default: on CUDA only)")
    p.add_argument("--prefill-batch", type=int, default=16, help="prefill batch (default: 16)")
    p.add_argument("--prefill-len", type=int, default=2048, help="prefill length (default: 2048)")
    p.add_argument("--prompt-len", type=int, default=32, help="decode prompt length (default: 32)")
    p.add_argument("--new-tokens", type=int, default=256, help="decoded tokens (default: 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions; the median is kept (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 2 on CPU)")
    p.add_argument("--prompt-text", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"),
                   help="text whose first tokens are the prompts (default: WikiText-2 test; random ids if absent)")
    p.add_argument("--sparse-weights", default=None,
                   help="pruned weights from quality.py --save-sparse, timed as dense matrices with zeros")
    p.add_argument("--sparse-label", default="sparsegpt@0.5", help="METHOD@SIZE of --sparse-weights")
    p.add_argument("--sparse-zeros", type=float, default=None,
                   help="without --sparse-weights: keep this fraction of every decoder Linear by magnitude "
                        "and time the result")
    p.add_argument("--records-dir", default=str(RECORDS_DIR), help=f"where speed.jsonl goes (default: {RECORDS_DIR})")
    p.add_argument("--model-name", default=None, help="model name in the records (default: from the file name)")
    p.add_argument("--weights", default=None,
                   help="what the weights are, for the records (default: derived from --model)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds after which no new model is started")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: prefill 2 x 64, 8 new tokens, 1 repeat (the records say quick)")
    return p


def config_from(args: argparse.Namespace) -> SpeedConfig:
    """A :class:`SpeedConfig` from parsed flags."""
    cuda = torch.device(args.device).type == "cuda"
    quick = args.quick
    weights = args.weights or (
        "dequantised GGUF (dense weights; sub-networks cut by the fitted ranking: same shapes)"
        if args.model.endswith(".gguf") else f"{args.model}")
    return SpeedConfig(
        model=args.model, rankings=args.rankings, method=args.method, sizes=args.sizes,
        phases=tuple(p for p in args.phases.replace(",", " ").split()), device=args.device,
        dtype=args.dtype or ("bfloat16" if cuda else "float32"),
        compile=args.compile if args.compile is not None else cuda,
        prefill_batch=2 if quick else args.prefill_batch, prefill_len=64 if quick else args.prefill_len,
        prompt_len=args.prompt_len, new_tokens=8 if quick else args.new_tokens,
        repeats=1 if quick else args.repeats, threads=args.threads or (None if cuda else 2),
        prompt_text=args.prompt_text, sparse_weights=args.sparse_weights, sparse_label=args.sparse_label,
        sparse_zeros=args.sparse_zeros, records_dir=args.records_dir, model_name=args.model_name,
        weights=weights, time_budget=args.time_budget, quick=quick,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse flags, build the configuration, run."""
    config = config_from(build_parser().parse_args(argv))
    records = run_speed(config)
    print(f"[speed] {len(records)} records appended to {Path(config.records_dir) / 'speed.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
