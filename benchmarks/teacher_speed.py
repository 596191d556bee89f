"""Teacher-text speed: tokens/s of sampling an LM's continuations of corpus prompts, on one GPU.

The decoding of ``ppn-bayes teacher-text`` (:class:`ppn_bayes.generation.Decoder`: a static
KV cache, grouped attention that reads the cache in place, the decode step with its
sampling compiled and captured as a CUDA graph) at several batch sizes, and for reference
the same decoder with the LM's own attention and no compilation. Each configuration
generates ``--rounds`` batches of ``--prompt-len`` corpus tokens plus ``--new-tokens``
sampled ones (temperature 0.8, top-k 50) after one untimed warm-up round (which compiles),
with a device sync before every clock read. ``tokens_per_s`` counts the new tokens only;
``written_tokens_per_s`` the prompts too (what a token store receives). One record per
configuration in ``teacher.jsonl``, written as soon as it is measured, with a decoded sample.

    python benchmarks/teacher_speed.py --gguf /root/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --corpus .device/b/wiki_summaries_en.txt --records-dir "$OUT/records"
    python benchmarks/teacher_speed.py --quick --device cpu --records-dir /tmp/records
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _configurations(args) -> list[dict]:
    configs = [dict(batch=b, grouped=True, compile=args.device == "cuda") for b in args.batches]
    if args.reference:
        configs.append(dict(batch=args.batches[0], grouped=False, compile=False, rounds=1))
    return configs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", help="the LM (.gguf or a Hugging Face directory); not needed with --quick")
    p.add_argument("--corpus", help="text the prompts come from; not needed with --quick")
    p.add_argument("--model-name", default="SmolLM2-135M-Instruct")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration (default: 3)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=224)
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference run with the LM's own attention, eager")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--records-dir", default="docs/benchmarks/records")
    p.add_argument("--time-budget", type=float, default=None, help="start no configuration after this many s")
    p.add_argument("--quick", action="store_true", help="a tiny Llama on the embedded text, on the CPU")
    args = p.parse_args(argv)

    from ppn_bayes.data import CharTokenizer, embedded_text, tokenize
    from ppn_bayes.generation import Decoder, synchronize
    from ppn_bayes.lm import load_lm
    from ppn_bayes.records import append_record

    began = time.perf_counter()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.quick:
        from ppn_bayes.demo import tiny_llama

        text = embedded_text()
        tokenizer = CharTokenizer.for_text(text)
        lm = tiny_llama(tokenizer.vocab_size).to(dtype)
        corpus = tokenize(text, tokenizer)
        args.batches, args.rounds, args.prompt_len, args.new_tokens = [4], 1, 8, 8
        name = "tiny-llama"
    else:
        lm, tokenizer = load_lm(args.gguf, dtype=dtype, device=args.device)
        corpus = tokenize(open(args.corpus, encoding="utf-8").read(), tokenizer)
        name = args.model_name
    lm = lm.to(args.device).eval()
    length = args.prompt_len + args.new_tokens
    offsets = torch.Generator().manual_seed(0)
    for config in _configurations(args):
        if args.time_budget is not None and time.perf_counter() - began > args.time_budget:
            print(f"[teacher_speed] time budget spent: skipping {config}", flush=True)
            continue
        B, rounds = config["batch"], config.get("rounds", args.rounds)
        decoder = Decoder(lm, max_len=length, batch_size=B, compile=config["compile"],
                          grouped_attention=config["grouped"])
        sampler = torch.Generator(device=args.device).manual_seed(0)

        def prompts():
            starts = torch.randint(0, corpus.numel() - args.prompt_len, (B,), generator=offsets)
            return corpus[starts[:, None] + torch.arange(args.prompt_len)].to(args.device)  # [B, P]

        settings = dict(temperature=0.8, top_k=50, generator=sampler)
        decoder.generate(prompts(), args.new_tokens, **settings)  # warm-up: compiles, captures
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        synchronize(args.device)
        start = time.perf_counter()
        for _ in range(rounds):
            new = decoder.generate(prompts(), args.new_tokens, **settings)  # [B, N]
        synchronize(args.device)
        seconds = time.perf_counter() - start
        sample = tokenizer.decode(new[0, :80].tolist()) if hasattr(tokenizer, "decode") else ""
        record = dict(batch=B, rounds=rounds, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                      temperature=0.8, top_k=50, dtype=str(dtype).replace("torch.", ""),
                      grouped_attention=config["grouped"], compiled=config["compile"], seconds=seconds,
                      tokens_per_s=rounds * B * args.new_tokens / seconds,
                      written_tokens_per_s=rounds * B * length / seconds,
                      peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
                      sample=sample, quick=args.quick, device=args.device)
        append_record("teacher", method="teacher-text", model=name, records_dir=args.records_dir, **record)
        print(f"[teacher_speed] batch {B} grouped={config['grouped']} compiled={config['compile']}: "
              f"{record['tokens_per_s']:,.0f} new tokens/s ({record['written_tokens_per_s']:,.0f} written)",
              flush=True)
        del decoder
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
