#!/usr/bin/env bash
# The quality and speed benchmarks on a 2-GPU H200 machine, in parts that each fit one
# 10-minute device command; both GPUs work at once on independent steps.
#
#   benchmarks/gpu_job.sh check   # the environment (~20 s)
#   benchmarks/gpu_job.sh part1   # ... part8: declared as data in benchmarks/jobs.py and run by
#                                 # benchmarks/run_job.py (`python3 benchmarks/run_job.py --help` lists
#                                 # them; `python3 benchmarks/run_job.py part6 --dry-run` shows the commands)
#   benchmarks/gpu_job.sh part9   # issue 15: the fit of record (quality.py's DEFAULT_FIT) at 100M tokens,
#                                 # 16 x 2048 a step, half wiki summaries, half teacher text (GEN_TOKENS
#                                 # written once from 32-token prompts, 1024-token sequences, top-k 64,
#                                 # temperature 1, as the reference; FREE_TEXT=1 adds the LM's free text from
#                                 # 1-token prompts and mixes the three a third each), held-out diagnostics
#                                 # every 250 steps; it stops with a checkpoint before LIMIT and the next
#                                 # call (machine still warm) resumes it; SEED (0) picks the fit; masks at all
#                                 # five sizes at the end (RECORD_STEPS=1830: the 60M-token fits of 1 Dec
#                                 # 2026); RECORD_EXTRA adds quality.py flags, e.g. --fit-set size_power=1
#   benchmarks/gpu_job.sh part10  # issue 15: the activation baselines again (their score was fixed), the
#                                 # width cuts, and width-kd at WIDTH_KD_SIZES (0.5,0.3) distilled on the
#                                 # same text, tokens (RECORD_STEPS x 16 x 2048) and schedule as the fit of
#                                 # record, stopped with a checkpoint before LIMIT: call again to go on; both LMs'
#                                 # bodies compiled (WIDTH_KD_COMPILE, default inductor; none: eager)
#   benchmarks/gpu_job.sh part11  # issue 15: ABLATION (ppn_bayes-flat; or ppn_bayes-point) with the fit of
#                                 # record's recipe and tokens, as part9 runs it
#   benchmarks/gpu_job.sh part12  # issue 15: BASE_METHODS (dense,sparsegpt) at BASE_SIZES (0.5) with every
#                                 # token's NLL kept (llm-compressor's wheels carried and installed first)
#   benchmarks/gpu_job.sh part13  # issue 15: width-kd at 0.5 on 12M tokens (the reference's 16 x 1024 x 732
#                                 # steps, warm-up 73, cosine) once per LR in WKD_LRS (1e-4,3e-4,1e-3), with
#                                 # WKD_BETA2 (0.999) for AdamW: a cheap sweep of the LM's rate, resumable
#                                 # (WKD_STEPS, WKD_SEQ: 732 and 1024; the warm-up a tenth of the steps)
#   benchmarks/gpu_job.sh part14  # issue 15: the bar's runs, one a GPU: JOBS (fit:0 fit:1 wkd:0.5
#                                 # wkd:0.3), GPUS of them at once (default: as many as there are GPUs;
#                                 # more share the GPUs in turn), the rest queued behind them (job I after
#                                 # job I - GPUS, while more than QUEUE_MIN s of LIMIT are left), each as
#                                 # part9 (fit:SEED; fit:SEED:METHOD another ppn_bayes method of quality.py,
#                                 # e.g. an ablation, with the same recipe; fit:SEED:METHOD:KEY=VALUE/KEY=VALUE
#                                 # that with FitConfig fields set, after RECORD_EXTRA's) or part10 (wkd:SIZE,
#                                 # width-kd on the fit's text and tokens; wkd:SIZE:width-kd-short the same,
#                                 # recorded apart, for a smaller RECORD_STEPS; WKD_EXTRA: its own quality.py
#                                 # flags, e.g. --fit-set warmup_steps=10 where RECORD_EXTRA sets the fits')
#                                 # runs it, each resumable in its own work folder (seedS, seedS-METHOD,
#                                 # seedS-METHOD-KEYVALUE-KEYVALUE, wkd-SIZE, wkd-SIZE-width-kd-short),
#                                 # logs gpuG-jobI.log, each fit's evaluations and ranking in $OUT/fits.tar
#                                 # (FOLDER/validation.jsonl, FOLDER/rankings.json: one file, as a call brings
#                                 # back at most 8); on one GPU, JOBS="fit:1 wkd:0.5" runs the second
#                                 # seed, then width-kd at 0.5
#   benchmarks/gpu_job.sh nll-out FOLDER...  # the token NLLs kept under $WORK/FOLDER/token-nll (parts 9-11,
#                                 # 13 and 14 with TOKEN_NLL=1: FOLDER seed0, wkd-0.5, wkd12-lr3e-4-b0.999, ...;
#                                 # part12's: base), each folder's with base's beside it (the dense LM the
#                                 # analysis compares against) in $OUT/token-nll-FOLDER.safetensors, for
#                                 # benchmarks/token_nll.py analyse here
#   benchmarks/gpu_job.sh cache-out  # torch.compile's cache ($WORK/inductor-cache) in 15 MiB parts under
#                                 # $OUT/inductor-cache; carried to a later machine, COMPILE_CACHE=that folder
#                                 # restores it before anything compiles
#   benchmarks/gpu_job.sh gen        # the teacher texts of part9-11 alone (with FREE_TEXT=1 gen-free too)
#   benchmarks/gpu_job.sh gen-out [gen-free]  # a teacher text of part9-11 into $OUT/gen (or gen-free):
#                                 # a store of ~32 MB in ~8 MB shards, to carry to a later machine as
#                                 # GEN_STORE (GEN_FREE_STORE) = that folder, instead of writing it again
#
# (Structured baselines without training, shortgpt, magnitude, activation, run as before:
# benchmarks/quality.py --methods shortgpt,magnitude,...; their records do not depend on the fit.)
#
# Every part can be rerun: finished methods are skipped (markers under $WORK/done/), fits
# resume from their checkpoints. Before part1 on a fresh machine: ../shared/tools/device-stage
# (two transfers) and benchmarks/stage_wheels.sh here (carry .whl); see benchmarks/README.md.
# Records go to $OUT/records/ (append them to docs/benchmarks/records/ here), the rankings to
# $OUT/rankings.json (speed.py reads it for the CPU run here), logs to $OUT/*.log.
# Checkpoints, caches and the rankings stay under $WORK (/root: kept while the machine is warm).
#
# Knobs (environment): benchmarks/jobs.py's KNOBS, with their defaults and what they do (the
# model and working paths, FIT_STEPS, LIMIT, the *_EXTRA flags of a CPU rehearsal with a tiny LM:
# DEVICE=cpu, QUALITY_EXTRA, SPEED_EXTRA, ..., as tests/test_report.py does); part9's own below.
set -uo pipefail
part="${1:?usage: gpu_job.sh check|part1|...|part14|nll-out|cache-out|gen|gen-out}"
START=$(date +%s)
export GPU_JOB_START=$START
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 LLM_COMPRESSOR_LOG_LEVEL=WARNING TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="${PYTHONPATH:-/tmp/site:$PWD}"
# OUT, MODEL, MODEL_NAME, TEXTS, WORK, DEVICE, LIMIT, RANKINGS, ... (the environment's, else
# benchmarks/jobs.py's defaults), REC ($OUT/records) and the array COMMON of quality.py's flags
knobs=$(python3 benchmarks/run_job.py --shell) || exit 2
eval "$knobs"
mkdir -p "$OUT/records" "$WORK"
# torch.compile's caches (inductor's graphs, Triton's kernels) in one folder under $WORK; COMPILE_CACHE: the
# parts of an earlier machine's cache (part cache-out), unpacked once before anything compiles
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor-cache}"
if [[ -n "${COMPILE_CACHE:-}" && ! -f "$WORK/inductor-cache.restored" ]]; then
  mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
  if cat "$COMPILE_CACHE"/part-* | tar xzf - -C "$TORCHINDUCTOR_CACHE_DIR"; then
    touch "$WORK/inductor-cache.restored"
    echo "[gpu_job] compile cache restored from $COMPILE_CACHE ($(du -sh "$TORCHINDUCTOR_CACHE_DIR" | cut -f1))"
  else
    echo "[gpu_job] $COMPILE_CACHE is no whole compile cache; compiling afresh"
  fi
fi

left() { echo $(( LIMIT - ($(date +%s) - START) )); }

check() {
  {
    nvidia-smi -L
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.device_count(), "transformers", transformers.__version__)'
    python3 -c 'import pyro, gguf; print("pyro", pyro.__version__)'
    python3 -m pip show pyarrow datasets 2>/dev/null | grep -E '^(Name|Version)'
    python3 -c 'import llmcompressor; print("llmcompressor", llmcompressor.__version__)' 2>&1 | tail -1
    ls -la "$MODEL" "$TEXTS"
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
}

prepare() {  # GGUF -> Hugging Face directory, and the tokens, cached under $WORK (~1 min, once)
  python3 benchmarks/run_job.py --prepare || exit 2
}

teacher_text() {  # teacher_text NAME PROMPT_LEN CARRIED: the LM's own text, written once into $WORK/NAME
  # (resumes an unfinished store) from PROMPT_LEN-token prompts of the summaries, or CARRIED: a store an
  # earlier session wrote and brought back (part gen-out), carried here
  local name="$1" prompt_len="$2" carried="${3:-}"
  local lm="$WORK/model"; [[ -f "$lm/config.json" ]] || lm="$MODEL"
  [[ -f "$WORK/$name.done" ]] && return 0
  if [[ -n "$carried" ]]; then  # checked whole (every shard's SHA-256) before it is used
    python3 -c 'import sys; from ppn_bayes.store import TokenStore; print("[gpu_job] teacher text:", TokenStore(sys.argv[1]).numel(), "tokens from", sys.argv[1])' \
      "$carried" >> "$OUT/gen.log" 2>&1 || { echo "[gpu_job] $carried is no whole token store" >> "$OUT/gen.log"; return 1; }
    rm -rf "$WORK/$name" && cp -r "$carried" "$WORK/$name" && touch "$WORK/$name.done"
    tail -n 1 "$OUT/gen.log"
    return 0
  fi
  local resume=(); [[ -d "$WORK/$name" ]] && resume=(--resume)
  local compiled=(); [[ "$DEVICE" == cuda* ]] && compiled=(--compile)  # the decode step's CUDA graphs
  echo "[gpu_job] $(date +%T) teacher text $name" >> "$OUT/gen.log"
  timeout --signal=TERM "$(( $(left) - 60 ))s" python3 -m ppn_bayes teacher-text --model "$lm" \
    --data "$TEXTS/wiki_summaries_en.txt" --out "$WORK/$name" --tokens "${GEN_TOKENS:-16000000}" \
    --prompt-len "$prompt_len" --new-tokens $(( 1024 - prompt_len )) --temperature 1.0 --top-k 64 \
    --batch-size "${GEN_BATCH:-2048}" --shard-tokens 4000000 --device "$DEVICE" --dtype bfloat16 "${compiled[@]}" \
    --quiet "${resume[@]}" \
    >> "$OUT/gen.log" 2>&1 && touch "$WORK/$name.done"
  tail -n 3 "$OUT/gen.log"
}
fit_data() {  # the teacher texts the fits and width-kd mix with the summaries, written or carried first:
  # the text from 32-token prompts (gen), and with FREE_TEXT=1 also the LM's free text from 1-token prompts
  # (gen-free: its own distribution, far wider than the summaries'); prints the comma-separated stores
  teacher_text gen 32 "${GEN_STORE:-}" >&2 && [[ -f "$WORK/gen.done" ]] || return 1
  if [[ "${FREE_TEXT:-0}" == 1 ]]; then
    teacher_text gen-free 1 "${GEN_FREE_STORE:-}" >&2 && [[ -f "$WORK/gen-free.done" ]] || return 1
    echo "$WORK/gen,$WORK/gen-free"
  else
    echo "$WORK/gen"
  fi
}
token_nll_flags() {  # token_nll_flags WORK: sets nll, quality.py's flags that keep every token's NLL under
  # WORK/token-nll when TOKEN_NLL=1 (none otherwise)
  nll=(); [[ "${TOKEN_NLL:-0}" == 1 ]] && nll=(--token-nll-dir "$1/token-nll")
}
workdir() {  # a work folder of its own that shares the cached model and tokens
  local work="$WORK/$1"; mkdir -p "$work"
  [[ -e "$work/model" ]] || ln -s "$WORK/model" "$work/model"
  [[ -e "$work/tokens" ]] || ln -s "$WORK/tokens" "$work/tokens"
  echo "$work"
}

record_fit() {  # record_fit METHOD FOLDER DATA [LOG]: the fit of record's recipe for METHOD on the summaries and
  # the stores DATA, stopped before LIMIT, resumable; its output in $OUT/LOG.log (gpu0)
  local method="$1" seed="${SEED:-0}" data="$3" log="$OUT/${4:-gpu0}.log" work budget
  work=$(workdir "$2")
  budget=$(( $(left) - 20 ))
  local nll; token_nll_flags "$work"
  local sets=(); [[ -n "${SETS:-}" ]] && for pair in ${SETS//\// }; do sets+=(--fit-set "$pair"); done
  echo "[gpu_job] $(date +%T) $method seed $seed ${SETS:-} ($budget s)" >> "$log"
  timeout --signal=TERM "${budget}s" python3 benchmarks/quality.py "${COMMON[@]}" --work-dir "$work" \
    --rankings "$work/rankings.json" --methods "$method" --fit-tokens "$data" --fit-batch 16 \
    --fit-steps "${RECORD_STEPS:-3052}" --fit-set seed="$seed" --fit-set warmup_steps=100 \
    --fit-set compile=inductor --fit-set autocast=bfloat16 \
    --fit-set checkpoint_every=1000 --fit-set eval_every=250 --fit-set eval_sizes=0.9,0.5,0.3 \
    --fit-eval-windows 8 --fit-stop-after "$(( budget - 60 ))" "${nll[@]}" ${RECORD_EXTRA:-} "${sets[@]}" >> "$log" 2>&1
  # its evaluations and ranking, with every other fit's of this machine, in one file: $OUT/fits.tar
  # (FOLDER/validation.jsonl, FOLDER/rankings.json), since a call brings back at most 8 files
  mkdir -p "$WORK/fits-out/$2"
  cp "$work/fits/$method.validation.jsonl" "$WORK/fits-out/$2/validation.jsonl" 2>/dev/null || true
  cp "$work/rankings.json" "$WORK/fits-out/$2/rankings.json" 2>/dev/null || true
  ( flock 9 && tar cf "$OUT/fits.tar.tmp" -C "$WORK/fits-out" . && mv "$OUT/fits.tar.tmp" "$OUT/fits.tar" ) \
    9> "$WORK/fits-out.lock"
}

width_kd_flags() {  # width_kd_flags DATA BUDGET: sets wkd, quality.py's flags that train width-kd on the fit
  # of record's text (the summaries less the fit's 8 held-out windows, and DATA), tokens (the fit's: RECORD_STEPS
  # x 16 windows) and schedule, stopped with a checkpoint 50 s before BUDGET (the seconds before the run is
  # killed: the rest is for the checkpoint's write and the loading) and checkpointed every 500 steps besides:
  # one list for parts 10 and 14
  wkd=(--width-kd-data "$1" --fit-batch 16 --fit-steps "${RECORD_STEPS:-3052}" --fit-set warmup_steps=100
       --fit-set compile="${WIDTH_KD_COMPILE:-inductor}" --fit-eval-windows 8 --width-kd-checkpoint-every 500
       --width-kd-stop-after "$(( $2 > 100 ? $2 - 50 : $2 / 2 ))" ${WKD_EXTRA:-})
}

record_width_kd() {  # record_width_kd SIZE DATA [LOG] [METHOD]: METHOD (width-kd, or width-kd-short) at SIZE
  # alone (width_kd_flags), in $WORK/wkd-SIZE (wkd-SIZE-METHOD for another), stopped before LIMIT, resumable
  local size="$1" data="$2" log="$OUT/${3:-gpu0}.log" method="${4:-width-kd}" work budget folder="wkd-$1"
  [[ "$method" == width-kd ]] || folder+="-$method"
  work=$(workdir "$folder")
  budget=$(( $(left) - 20 ))
  local nll wkd; token_nll_flags "$work"; width_kd_flags "$data" "$budget"
  echo "[gpu_job] $(date +%T) $method $size ($budget s)" >> "$log"
  timeout --signal=TERM "${budget}s" python3 benchmarks/quality.py "${COMMON[@]}" --work-dir "$work" \
    --rankings "$work/rankings.json" --methods "$method" --width-kd-sizes "$size" "${wkd[@]}" \
    --time-budget "$(( budget - 60 ))" "${nll[@]}" >> "$log" 2>&1
  local state  # an unfinished run: where it resumes (quality.py names the folder f"{size:g}": 0.50 -> 0.5)
  state="$work/$method/$(python3 -c 'import sys; print(f"{float(sys.argv[1]):g}")' "$size")/checkpoint/state.json"
  [[ -f "$state" ]] && echo "[gpu_job] $(date +%T) $method $size: checkpoint at step" \
    "$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["step"])' "$state")" >> "$log"
  return 0
}

case "$part" in
  check) check ;;
  part1)
    check > /dev/null
    python3 benchmarks/run_job.py part1 || exit $? ;;
  part[2-8])
    python3 benchmarks/run_job.py "$part" || exit $? ;;
  part9)
    prepare
    data=$(fit_data) && record_fit ppn_bayes "seed${SEED:-0}" "$data"
    ;;
  part10)
    prepare
    if data=$(fit_data); then
      work=$(workdir wkd)
      budget=$(( $(left) - 20 ))
      token_nll_flags "$work"; width_kd_flags "$data" "$budget"
      echo "[gpu_job] $(date +%T) width-kd and the activation baselines ($budget s)" >> "$OUT/gpu0.log"
      timeout --signal=TERM "${budget}s" python3 benchmarks/quality.py "${COMMON[@]}" --work-dir "$work" \
        --rankings "$work/rankings.json" --methods activation,activation-uniform,width,width-kd \
        --width-kd-sizes "${WIDTH_KD_SIZES:-0.5,0.3}" "${wkd[@]}" \
        --width-kd-tokens "$(( ${RECORD_STEPS:-3052} * 16 * 2048 ))" "${nll[@]}" \
        --time-budget "$(( budget * 8 / 10 ))" >> "$OUT/gpu0.log" 2>&1
    fi
    ;;
  part11)
    prepare
    data=$(fit_data) && record_fit "${ABLATION:-ppn_bayes-flat}" "${ABLATION:-ppn_bayes-flat}" "$data"
    ;;
  part12)
    prepare
    work=$(workdir base)
    budget=$(( $(left) - 20 ))
    echo "[gpu_job] $(date +%T) ${BASE_METHODS:-dense,sparsegpt} at ${BASE_SIZES:-0.5} ($budget s)" >> "$OUT/gpu0.log"
    timeout --signal=TERM "${budget}s" python3 benchmarks/quality.py "${COMMON[@]}" --work-dir "$work" \
      --rankings "$work/rankings.json" --methods "${BASE_METHODS:-dense,sparsegpt}" --sizes "${BASE_SIZES:-0.5}" \
      --token-nll-dir "$work/token-nll" --time-budget "$(( budget * 8 / 10 ))" >> "$OUT/gpu0.log" 2>&1
    ;;
  part13)
    prepare
    if data=$(fit_data); then
      lrs="${WKD_LRS:-1e-4,3e-4,1e-3}" steps="${WKD_STEPS:-732}" seq="${WKD_SEQ:-1024}"
      for lr in ${lrs//,/ }; do  # one work folder each: its own checkpoint and done marker
        work=$(workdir "wkd12-lr$lr-b${WKD_BETA2:-0.999}")
        token_nll_flags "$work"
        budget=$(( $(left) - 20 ))
        (( budget > 60 )) || break
        echo "[gpu_job] $(date +%T) width-kd 0.5, $(( steps * 16 * seq )) tokens, lr $lr," \
          "beta2 ${WKD_BETA2:-0.999} ($budget s)" >> "$OUT/gpu0.log"
        timeout --signal=TERM "${budget}s" python3 benchmarks/quality.py "${COMMON[@]}" --work-dir "$work" \
          --rankings "$work/rankings.json" --methods width-kd --width-kd-sizes 0.5 --width-kd-data "$data" \
          --fit-batch 16 --fit-seq-len "$seq" --fit-steps "$steps" --width-kd-tokens "$(( steps * 16 * seq ))" \
          --fit-set warmup_steps="$(( steps / 10 ))" \
          --fit-set lr_lm="$lr" --fit-set adam_beta2="${WKD_BETA2:-0.999}" --fit-set compile=inductor \
          --width-kd-checkpoint-every 100 --time-budget "$(( budget * 8 / 10 ))" "${nll[@]}" >> "$OUT/gpu0.log" 2>&1
      done
    fi
    ;;
  part14)
    read -r -a jobs <<< "${JOBS:-fit:0 fit:1 wkd:0.5 wkd:0.3}"
    for job in "${jobs[@]}"; do
      [[ "$job" =~ ^(fit:[0-9]+(:[A-Za-z0-9_.+-]+(:[a-z0-9_]+=[A-Za-z0-9_.,-]+(/[a-z0-9_]+=[A-Za-z0-9_.,-]+)*)?)?|wkd:[0-9.]+(:[A-Za-z0-9_.+-]+)?)$ ]] \
        || { echo "unknown job $job in JOBS: fit:SEED, fit:SEED:METHOD (a method quality.py fits)," \
                  "fit:SEED:METHOD:KEY=VALUE/KEY=VALUE... (FitConfig fields), wkd:SIZE or wkd:SIZE:width-kd-short"; exit 2; }
      if [[ "$job" == fit:*:* ]]; then  # a method quality.py fits and FitConfig fields, named before anything is prepared
        IFS=: read -r _ _ method sets <<< "$job"
        python3 -c 'import dataclasses, sys; sys.path.insert(0, "benchmarks"); from protocol import ids
fits = ids(builder="fit")
if sys.argv[1] not in fits:
    print(f"unknown fit method {sys.argv[1]!r} in JOBS; quality.py fits:", *fits); sys.exit(2)
if sys.argv[2]:
    from ppn_bayes import FitConfig
    fields = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = [pair for pair in sys.argv[2].split("/") if pair.partition("=")[0] not in fields]
    if unknown:
        print(f"unknown FitConfig field in JOBS: {unknown[0]!r}"); sys.exit(2)' \
          "$method" "$sets" || exit 2
      fi
      if [[ "$job" == wkd:*:* ]]; then  # a width-kd method of the registry, named before anything is prepared
        python3 -c 'import sys; sys.path.insert(0, "benchmarks"); from protocol import ids
kds = ids(builder="width cut, distilled")
if sys.argv[1].split(":")[2] not in kds:
    print(f"unknown job {sys.argv[1]} in JOBS: the width-kd methods are", *kds); sys.exit(2)' "$job" || exit 2
      fi
    done
    [[ "${GPUS:-1}" =~ ^[1-9][0-9]*$ ]] || { echo "GPUS must be a whole number of jobs at once, got '$GPUS'"; exit 2; }
    [[ "${QUEUE_MIN:-120}" =~ ^[0-9]+$ ]] || { echo "QUEUE_MIN must be whole seconds, got '$QUEUE_MIN'"; exit 2; }
    prepare
    data=$(fit_data) || exit 1
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    (( gpus >= 1 )) || gpus=1
    at_once="${GPUS:-$gpus}"  # jobs at once; more than the machine's GPUs share them, in turn
    # slot k runs jobs k, k + at_once, k + 2 at_once, ... one after the other on GPU k mod gpus: a job
    # starts only with more than QUEUE_MIN seconds of LIMIT left (an unfinished one stops near LIMIT, so
    # what follows it waits for a later call, which resumes it and skips what is done)
    for (( k = 0; k < at_once && k < ${#jobs[@]}; k++ )); do
      gpu=$(( k % gpus ))
      ( export CUDA_VISIBLE_DEVICES=$gpu
        for (( i = k; i < ${#jobs[@]}; i += at_once )); do
          job="${jobs[$i]}" log="gpu$gpu-job$i"
          if (( $(left) <= ${QUEUE_MIN:-120} )); then
            echo "[gpu_job] $(date +%T) $job: $(left) s left, for a later call" >> "$OUT/$log.log"; break
          fi
          echo "[gpu_job] GPU $gpu: $job"
          case "$job" in
            fit:*:*) IFS=: read -r _ seed method sets <<< "$job"
                     # the folder (and nll-out's file) named by the sets, '=' dropped, '/' and ',' as '-' and '_':
                     # fit:0:ppn_bayes:train_sizes=0.5,0.7/size_power=1 -> seed0-ppn_bayes-train_sizes0.5_0.7-size_power1
                     folder="seed$seed-$method"; [[ -n "$sets" ]] && folder+="-${sets//[=]/}"
                     folder="${folder//\//-}"
                     SETS="$sets" SEED="$seed" record_fit "$method" "${folder//,/_}" "$data" "$log" ;;
            fit:*) SEED="${job#fit:}" record_fit ppn_bayes "seed${job#fit:}" "$data" "$log" ;;
            wkd:*) IFS=: read -r _ size method <<< "$job"
                   record_width_kd "$size" "$data" "$log" "${method:-width-kd}" ;;
          esac
        done ) &
    done
    wait
    ;;
  nll-out)  # nll-out FOLDER...: the token NLLs of each $WORK/FOLDER/token-nll, with part12's (base: the dense LM
    # and SparseGPT, what the analysis compares against) beside them, in $OUT/token-nll-FOLDER.safetensors
    shift
    base=(); [[ -d "$WORK/base/token-nll" ]] && base=("$WORK/base/token-nll")
    for f in "${@:-base}"; do
      [[ -d "$WORK/$f/token-nll" ]] || { echo "no token NLLs in $WORK/$f/token-nll"; exit 2; }
      folders=("${base[@]}"); [[ "$f" == base ]] || folders+=("$WORK/$f/token-nll")
      python3 benchmarks/token_nll.py pack "${folders[@]}" "$OUT/token-nll-$f.safetensors" || exit $?
    done
    exit 0 ;;
  cache-out)  # the compile cache in parts of 15 MiB under $OUT/inductor-cache, to carry to a later machine
    # as COMPILE_CACHE (a cold compile of the fit costs ~200 s of a fresh machine; its cache loads in seconds)
    rm -rf "$OUT/inductor-cache" && mkdir -p "$OUT/inductor-cache"
    [[ -d "$TORCHINDUCTOR_CACHE_DIR" ]] || { echo "no compile cache at $TORCHINDUCTOR_CACHE_DIR"; exit 2; }
    tar czf - -C "$TORCHINDUCTOR_CACHE_DIR" . | split -b 15M -d - "$OUT/inductor-cache/part-" || exit 2
    n=$(ls "$OUT/inductor-cache" | wc -l)
    du -sh "$TORCHINDUCTOR_CACHE_DIR" "$OUT/inductor-cache"
    (( n <= 7 )) || { echo "the cache makes $n parts: more than comes back (8 files a call)"; exit 2; }
    exit 0 ;;
  gen)  # the teacher texts alone (the model and tokens cached first): a machine with too little time left for a
    # fit still writes them, for gen-out to bring back
    prepare
    fit_data > /dev/null || exit 1
    exit 0 ;;
  gen-out)  # gen-out [NAME]: a teacher text's store (gen, or gen-free; shards of about 8 MB: part9-11 write
    # 4M-token shards) into $OUT/NAME, to bring back and carry to a later machine as GEN_STORE or
    # GEN_FREE_STORE (saves its ~4 minutes of generation)
    name="${2:-gen}"
    [[ -f "$WORK/$name.done" ]] || { echo "no finished teacher text in $WORK/$name"; exit 2; }
    mkdir -p "$OUT/$name" && cp "$WORK/$name"/manifest.json "$WORK/$name"/shard-*.safetensors "$OUT/$name/" \
      && ls -la "$OUT/$name"
    exit 0 ;;
  *) echo "unknown part $part: check, part1 to part14, nll-out, cache-out, gen, gen-out"; exit 2 ;;
esac
[[ -f "$RANKINGS" ]] && cp "$RANKINGS" "$OUT/rankings.json"
echo "[gpu_job] $part done in $(( $(date +%s) - START )) s; records:"
wc -l "$REC"/*.jsonl 2>/dev/null || true
grep -h "^\[quality\]\|^\[speed\]\|FAILED\|Error" "$OUT"/gpu*.log 2>/dev/null | tail -n 40 || true
