"""The GPU job's parts as data: what runs where, with how much of the part's time, read by
``benchmarks/run_job.py PART`` (``benchmarks/gpu_job.sh partN`` calls it for parts 1 to 8).

Nothing here runs anything; the words of the language, interpreted by run_job.py:

- ``KNOBS``: the job's settings, each read from the environment when set there, else the
  default given (``$NAME`` of an earlier knob is expanded in a default). The paths under
  ``/root`` and the dated recipe choice live here only.
- ``VALUES``: words computed when a step starts (so that a file an earlier step wrote
  counts): ``{"words": [...]}``; ``{"file_words": PATH, "default": TEXT}`` (the file's
  words, else the default's); ``{"json": PATH, "keys": [...], "default": TEXT}``;
  ``{"first": [[CONDITION, [...]], ...]}`` (the words of the first condition that holds;
  ``True`` always holds).
- In a step's words, ``$NAME`` or ``${NAME}`` is replaced by a knob, a value (its words
  joined by spaces) or a name ``set`` by the step; a word ``@NAME`` alone is replaced by
  the words of the value, or the knob split at spaces (as the shell splits ``$NAME``).
- A condition: ``{"exists": [PATH, ...]}`` (every path exists), ``{"given": KNOB}`` (set in
  the environment), ``{"any": [CONDITION, ...]}``.
- A node of a part: a step, ``{"steps": [NODE, ...]}`` (in order) or ``{"together": [NODE,
  ...]}`` (at once; with ``"in_turn_on_one_gpu": True`` in order where the machine has one
  GPU), either with ``"gpu"``: 0, 1 or ``"second"`` (1, or 0 on a one-GPU machine) for
  ``CUDA_VISIBLE_DEVICES`` of everything below it.
- A step: ``{"run": SCRIPT, "args": [...], "log": NAME}`` runs ``python3 SCRIPT ARGS`` with
  its output appended to ``$OUT/NAME``, under ``timeout`` at what is left of the part's
  ``LIMIT`` less ``"reserve"`` seconds, with ``--time-budget`` of 80% of that appended
  unless ``"time_budget": False``; a budget under 30 s skips it (with a line in the log);
  ``"timeout": False`` runs it without a limit. ``"use": TEMPLATE`` starts from a template
  (its ``@ARGS`` the step's ``args``); ``"set"`` names words for the step; ``"each":
  {"items": [...] or KNOB, "as": [NAMES], "sep": ":"}`` repeats it for each item (an item
  split at ``sep`` into the names); ``"when"`` a condition (else ``"skip_note"`` is logged);
  ``"note"`` a line logged before it runs. ``{"copy": GLOB, "to": FOLDER}`` copies files.
- A part: ``{"doc": ..., "prepare": True or False, "steps": [NODE, ...]}``; ``prepare``
  converts and caches the model and tokens under ``$WORK`` first (``quality.py --prepare``).
"""

from __future__ import annotations

#: name -> default; the environment's value wins. The order matters: a default may use the knobs above it.
KNOBS = {
    "OUT": "/tmp/gpu-job-out",
    "MODEL": "/root/SmolLM2-135M-Instruct.Q4_1.gguf",
    "MODEL_NAME": "SmolLM2-135M-Instruct",
    "TEXTS": ".device/b",
    "WORK": "/root/ppn-work",  # checkpoints, caches and rankings: kept while the machine is warm
    "DEVICE": "cuda",
    # the fit of record: FIT_STEPS of FIT_BATCH x FIT_SEQ tokens, with the best recipe's settings
    "FIT_STEPS": "160",
    "RECIPE_STEPS": "150",
    "FIT_BATCH": "8",
    "FIT_SEQ": "2048",
    "LIMIT": "560",  # seconds per part: one device command of 10 minutes, with room to spare
    "ABLATION_SIZES": "0.5,0.3,0.4,0.7,0.9",
    "RANKINGS": "$WORK/rankings.json",  # carry one in for part2 when $WORK is gone
    # the fit of record's recipe where $WORK/best-recipe.txt is gone: the one part1 chose on 28 Nov 2026
    "RECORD_RECIPE": "--fit-set gate_coupling=shared --fit-set init_jitter=0.5 --fit-set lr_lm=3e-05 "
                     "--freeze-fraction 0.5",
    "SCALING_BATCHES": "32:30:5 48:30:5 64:24:4",  # part4: global batch:steps:warmup, 1024 tokens each
    "SCALING_BATCH": "48",  # part5: sequences per GPU
    "LONG_STEPS": "500",  # part7
    "COST_STEPS": "24",  # part8
    "KD_STEPS": "80",
    "KD_METHODS": "ppn_bayes-kd,ppn_bayes-kd-prefix",
    "KD_COMPILE": "inductor",
    # extra flags, for a CPU rehearsal with a tiny LM (tests/test_report.py)
    "QUALITY_EXTRA": "",
    "SPEED_EXTRA": "",
    "RECIPE_EXTRA": "",
    "SPEC_EXTRA": "",
    "SCALING_EXTRA": "",
    "COST_EXTRA": "",
    "TEACHER_EXTRA": "",
    "KD_EXTRA": "",
}

_HAS_LM = {"exists": ["$WORK/model/config.json"]}
VALUES = {
    "REC": {"words": ["$OUT/records"]},
    "COMMON": {"words": ["--model", "$MODEL", "--eval-text", "$TEXTS/wiki.test.raw", "--train-text",
                         "$TEXTS/wiki_summaries_en.txt", "--work-dir", "$WORK", "--records-dir", "$REC",
                         "--model-name", "$MODEL_NAME", "--device", "$DEVICE", "--fit-batch", "$FIT_BATCH",
                         "--fit-seq-len", "$FIT_SEQ", "--fit-set", "checkpoint_every=50", "--skip-done",
                         "@QUALITY_EXTRA"]},
    # the recipe part1 chose, as flags (none before it chose); the fit of record's for parts 6 and 7
    "RECIPE": {"file_words": "$WORK/best-recipe.txt", "default": ""},
    "RECORD_FLAGS": {"file_words": "$WORK/best-recipe.txt", "default": "$RECORD_RECIPE"},
    # the steps the fit of record took: the ablations take as many
    "STEPS_OF_RECORD": {"json": "$RANKINGS", "keys": ["rankings", "ppn_bayes", "fit", "steps"],
                        "default": "$FIT_STEPS"},
    "LM": {"first": [[_HAS_LM, ["$WORK/model"]], [True, ["$MODEL"]]]},  # the dequantised LM, else the GGUF
    # speed.py: the fitted LM (the sub-networks' own weights), else the dequantised one (same shapes)
    "SPEED_MODEL": {"first": [
        [{"exists": ["$WORK/fits/ppn_bayes/lm/config.json"]},
         ["--model", "$WORK/fits/ppn_bayes/lm", "--weights", "the ppn_bayes fit's LM (dense: all units kept)"]],
        [_HAS_LM, ["--model", "$WORK/model", "--weights", "the dequantised GGUF (same shapes)"]],
        [True, ["--model", "$MODEL", "--weights", "the dequantised GGUF (same shapes)"]]]},
    "SPARSE": {"first": [
        [{"exists": ["$WORK/sparse/sparsegpt-0.5.safetensors"]},
         ["--sparse-weights", "$WORK/sparse/sparsegpt-0.5.safetensors", "--sparse-label", "sparsegpt@0.5"]],
        [True, ["--sparse-zeros", "0.5"]]]},
    "RANKINGS_FLAGS": {"first": [[{"exists": ["$RANKINGS"]}, ["--rankings", "$RANKINGS"]], [True, []]]},
}

TEMPLATES = {
    # quality.py on one GPU with the fit of record's recipe
    "quality": {"run": "benchmarks/quality.py", "args": ["@COMMON", "@ARGS", "@RECORD_FLAGS"], "reserve": 10},
    # fit_scaling.py on 1 and 2 GPUs (a later --gpus overrides), stopped at the part's limit
    "scaling": {"run": "benchmarks/fit_scaling.py", "log": "scaling.log", "reserve": 5, "time_budget": False,
                "args": ["--model", "$LM", "--model-name", "$MODEL_NAME", "--device", "$DEVICE", "--train-text",
                         "$TEXTS/wiki_summaries_en.txt", "--gpus", "1", "2", "--work-dir", "$WORK/scaling",
                         "--records-dir", "$REC", "@ARGS", "@SCALING_EXTRA"]},
    # an ablation at the fit of record's steps and recipe, once that fit is done
    "ablation": {"run": "benchmarks/quality.py", "log": "gpu0-$M.log", "reserve": 10,
                 "when": {"any": [{"exists": ["$RANKINGS"]}, {"given": "FIT_STEPS"}]},
                 "skip_note": "[gpu_job] the fit of record is not done: ablations $M wait for a later part",
                 "note": "[gpu_job] ablations $M: $STEPS_OF_RECORD steps of $FIT_BATCH x $FIT_SEQ tokens, $RECIPE",
                 "args": ["@COMMON", "--fit-steps", "$STEPS_OF_RECORD", "--methods", "$M", "--rankings",
                          "$WORK/rankings-ablations.$M.json", "--ablation-sizes", "$ABLATION_SIZES", "@RECIPE"]},
    # speed.py: dense, the sub-networks of the fit of record, one sparse model
    "speed": {"run": "benchmarks/speed.py", "reserve": 10,
              "args": ["@SPEED_MODEL", "@RANKINGS_FLAGS", "--phases", "$PHASE", "--sizes", "0.5,0.3,0.4,0.7,0.9",
                       "--records-dir", "$REC", "--prompt-text", "$TEXTS/wiki.test.raw", "--model-name",
                       "$MODEL_NAME", "--device", "$DEVICE", "@SPARSE", "@SPEED_EXTRA"]},
}

_FP32_CURVES = ["--precision", "fp32", "--global-batch", "32", "--seq-len", "512", "--steps", "16", "--warmup", "3"]
_STRONG = {"items": "SCALING_BATCHES", "as": ["B", "N", "W"], "sep": ":"}
_STRONG_ARGS = ["--global-batch", "$B", "--steps", "$N", "--warmup", "$W"]
_RECIPE_RUN = {"run": "benchmarks/fit_recipes.py", "log": "recipe-$NAME.log", "reserve": 300, "time_budget": False,
               "args": ["--model", "$MODEL", "--eval-text", "$TEXTS/wiki.test.raw", "--train-text",
                        "$TEXTS/wiki_summaries_en.txt", "--work-dir", "$WORK", "--records-dir", "$REC", "--device",
                        "$DEVICE", "--recipe", "$NAME", "--steps", "$RECIPE_STEPS", "@RECIPE_EXTRA"]}

JOBS = {
    "part1": {
        "doc": "six short fits of the recipe search, three per GPU; then GPU 0: dense and the fit of record with "
               "the best recipe; GPU 1 meanwhile: SparseGPT and Wanda, unstructured and 2:4 (~9 min)",
        "prepare": True,
        "steps": [{"together": [
            {"steps": [
                {"together": [{**_RECIPE_RUN, "gpu": 0, "each": {"items": ["default", "lr1e-5", "warm"], "as": ["NAME"]}},
                              {**_RECIPE_RUN, "gpu": 1, "each": {"items": ["shared", "shared-warm", "shared-1e-4"],
                                                                 "as": ["NAME"]}}]},
                {"run": "benchmarks/fit_recipes.py", "log": "choose.log", "timeout": False,
                 "args": ["--choose", "--records-dir", "$REC", "--out", "$WORK/best-recipe.txt"]},
                {"run": "benchmarks/quality.py", "gpu": 0, "log": "gpu0.log", "reserve": 10,
                 "args": ["@COMMON", "--methods", "dense,ppn_bayes", "--fit-steps", "$FIT_STEPS", "--rankings",
                          "$RANKINGS", "@RECIPE"]}]},
            {"gpu": 1, "steps": [
                {"run": "benchmarks/quality.py", "log": "gpu1.log", "reserve": 200,
                 "args": ["@COMMON", "--methods", "wanda", "--sizes", "0.5,0.4,0.3,0.7,0.9", "--rankings",
                          "$WORK/rankings-baselines.json"]},
                {"run": "benchmarks/quality.py", "log": "gpu1.log", "reserve": 10,
                 "args": ["@COMMON", "--methods", "sparsegpt,sparsegpt-2:4,wanda-2:4", "--sizes", "0.4,0.3",
                          "--rankings", "$WORK/rankings-baselines.json"]}]}]}],
    },
    "part2": {
        "doc": "GPU 0: the ablations frozen, flat and point side by side, then nodistill; GPU 1: speculative "
               "decoding, alone (~9 min)",
        "prepare": True,
        "steps": [{"together": [
            {"gpu": 0, "steps": [
                {"together": [{"use": "ablation", "each": {"items": ["ppn_bayes-frozen", "ppn_bayes-flat",
                                                                     "ppn_bayes-point"], "as": ["M"]}}]},
                {"use": "ablation", "set": {"M": "ppn_bayes-nodistill"}}]},
            {"gpu": 1, "run": "benchmarks/speculative.py", "log": "gpu1.log", "reserve": 10,
             "when": {"exists": ["$WORK/fits/ppn_bayes/lm/config.json", "$RANKINGS"]},
             "args": ["--model", "$WORK/fits/ppn_bayes/lm", "--rankings", "$RANKINGS", "--data",
                      "$TEXTS/wiki.test.raw", "--records-dir", "$REC", "--model-name", "$MODEL_NAME", "--shared",
                      "--sizes", "0.3,0.4,0.5,0.6,0.7", "--ks", "2,3,4,6,8", "--out",
                      "$OUT/speculative-table.json", "@SPEC_EXTRA"]}]}],
    },
    "part3": {
        "doc": "fit scaling on 1 and 2 GPUs: weak (16 x 1024 per GPU), strong (16 x 1024 in all), curves in "
               "float32; then speed, prefill on GPU 0 and decode on GPU 1 (~6 min)",
        "prepare": True,
        "steps": [
            {"use": "scaling", "args": ["--weak", "--global-batch", "16", "--steps", "25"]},
            {"use": "scaling", "args": ["--global-batch", "16", "--steps", "25"]},
            {"use": "scaling", "args": ["--precision", "fp32", "--global-batch", "8", "--seq-len", "512", "--steps",
                                        "12", "--warmup", "2"]},
            {"together": [{"use": "speed", "gpu": 0, "log": "gpu0.log", "set": {"PHASE": "prefill"}},
                          {"use": "speed", "gpu": 1, "log": "gpu1.log", "set": {"PHASE": "decode"}}]}],
    },
    "part4": {
        "doc": "the second GPU: Wanda at 0.9 and 0.7 (the rows part1 ran out of time for); GPU 0 meanwhile: one "
               "GPU's fit throughput at larger global batches (SCALING_BATCHES) and fp32 curves at 32 x 512; then "
               "both GPUs against those one-GPU results (--reuse). On one GPU, Wanda first (~8 min)",
        "prepare": True,
        "steps": [
            {"together": [
                {"run": "benchmarks/quality.py", "gpu": "second", "log": "gpu1.log", "reserve": 10,
                 "args": ["@COMMON", "--methods", "wanda", "--sizes", "0.9,0.7", "--rankings",
                          "$WORK/rankings-baselines.json"]},
                {"gpu": 0, "steps": [
                    {"use": "scaling", "each": _STRONG, "args": ["--gpus", "1", "--reuse", *_STRONG_ARGS]},
                    {"use": "scaling", "args": ["--gpus", "1", "--reuse", *_FP32_CURVES]}]}],
             "in_turn_on_one_gpu": True},
            {"use": "scaling", "each": _STRONG, "args": ["--gpus", "1", "2", "--reuse", *_STRONG_ARGS]},
            {"use": "scaling", "args": ["--gpus", "1", "2", "--reuse", *_FP32_CURVES]},
            {"copy": "$WORK/scaling/results/*.json", "to": "$OUT/scaling-results"}],
    },
    "part5": {
        "doc": "two GPUs against one at the batch one GPU runs best (SCALING_BATCH x 1024; part4's run at 64 "
               "failed): weak scaling with the curve of one GPU accumulating the same global batch, strong "
               "scaling of that batch, the curves in float32 (~6 min)",
        "prepare": False,
        "steps": [
            {"use": "scaling", "args": ["--weak", "--match-curves", "--reuse", "--global-batch", "$SCALING_BATCH",
                                        "--steps", "20", "--warmup", "4"]},
            {"use": "scaling", "args": ["--reuse", "--global-batch", "$SCALING_BATCH", "--steps", "20", "--warmup",
                                        "4"]},
            {"use": "scaling", "args": ["--weak", "--match-curves", "--reuse", "--precision", "fp32",
                                        "--global-batch", "16", "--seq-len", "512", "--steps", "16", "--warmup", "3"]},
            {"copy": "$WORK/scaling/results/*.json", "to": "$OUT/scaling-results"}],
    },
    "part6": {
        "doc": "the fit's teacher: GPU 0 fits with the frozen original LM as teacher (ppn_bayes-original) and "
               "fine-tunes its sizes 0.5, 0.4, 0.3; the second GPU the same from the frozen-LM fit "
               "(ppn_bayes-frozen+distill) (~7 min)",
        "prepare": True,
        "steps": [{"together": [
            {"use": "quality", "gpu": 0, "log": "gpu0.log",
             "args": ["--fit-steps", "$FIT_STEPS", "--methods", "ppn_bayes-original,ppn_bayes-original+distill",
                      "--finetune-sizes", "0.5,0.4,0.3", "--rankings", "$WORK/rankings-original.json"]},
            {"use": "quality", "gpu": "second", "log": "gpu1.log",
             "args": ["--fit-steps", "$FIT_STEPS", "--methods", "ppn_bayes-frozen+distill", "--finetune-sizes",
                      "0.5,0.4,0.3", "--ablation-sizes", "$ABLATION_SIZES", "--rankings",
                      "$WORK/rankings-frozen.json"]}], "in_turn_on_one_gpu": True}],
    },
    "part7": {
        "doc": "GPU 0: the original teacher over a longer fit (ppn_bayes-original-long, LONG_STEPS steps); the "
               "second GPU: ppn_bayes-original, then fine-tunes of 4 x its tokens at 0.4, 0.3, 0.5 (~9 min)",
        "prepare": True,
        "steps": [{"together": [
            {"use": "quality", "gpu": 0, "log": "gpu0.log",
             "args": ["--fit-steps", "$LONG_STEPS", "--methods", "ppn_bayes-original-long", "--rankings",
                      "$WORK/rankings-original-long.json"]},
            {"use": "quality", "gpu": "second", "log": "gpu1.log",
             "args": ["--fit-steps", "$FIT_STEPS", "--methods", "ppn_bayes-original+distill-long",
                      "--finetune-sizes", "0.4,0.3,0.5", "--rankings", "$WORK/rankings-original.json"]}],
            "in_turn_on_one_gpu": True}],
    },
    "part8": {
        "doc": "one GPU: the one-pass fit's cost against a plain KD step at 16 x 2048 (fit_cost.py), teacher-text "
               "speed (teacher_speed.py), then the distillation-only fits (KD_METHODS) at the fit of record's "
               "2.6M tokens, 16 x 2048 a step, compiled, bf16 (~9 min)",
        "prepare": True,
        "steps": [
            {"run": "benchmarks/fit_cost.py", "log": "fit_cost.log", "reserve": 420,
             "args": ["--model", "$LM", "--model-name", "$MODEL_NAME", "--train-text", "$TEXTS/wiki_summaries_en.txt",
                      "--device", "$DEVICE", "--records-dir", "$REC", "--work-dir", "$WORK/fit-cost", "--steps",
                      "$COST_STEPS", "--warmup", "6", "@COST_EXTRA"]},
            {"run": "benchmarks/teacher_speed.py", "log": "teacher_speed.log", "reserve": 240,
             "when": {"exists": ["benchmarks/teacher_speed.py"]},
             "args": ["--gguf", "$MODEL", "--corpus", "$TEXTS/wiki_summaries_en.txt", "--records-dir", "$REC",
                      "--device", "$DEVICE", "@TEACHER_EXTRA"]},
            {"run": "benchmarks/quality.py", "log": "gpu0.log", "reserve": 10,
             "args": ["@COMMON", "--fit-batch", "16", "--fit-steps", "$KD_STEPS", "--methods", "$KD_METHODS",
                      "--fit-set", "lr_lm=1e-4", "--fit-set", "compile=$KD_COMPILE", "--fit-set",
                      "autocast=bfloat16", "--rankings", "$WORK/rankings-kd.json", "@KD_EXTRA"]}],
    },
}
