"""Bad input across every subcommand: exit status 2, one clear line naming the problem, no
traceback, nothing written (issue 17).

Every case runs ``ppn_bayes.cli.main`` in-process on fixtures built once for the module (a
tiny Llama, a one-step fit checkpoint, its ranked checkpoint, a sub-network, mask files,
token and text files, corrupt copies of each) and checks, besides the exit status and the
one line, that no file under the fixtures or the case's own folder appeared, vanished or
changed. A few cases run the real ``ppn-bayes`` in a subprocess for the traceback check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppn_bayes.cli import main

ROOT = Path(__file__).resolve().parents[1]


# -- fixtures ---------------------------------------------------------------------------------
def _hf_tokenizer(alphabet: str):
    """A Hugging Face fast tokenizer over the same characters as the char tokenizer (same
    vocabulary size, another kind of tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=alphabet[0]))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Paths of every fixture, by name (see the module's docstring)."""
    from conftest import tiny_lm

    from ppn_bayes import CharTokenizer, FitConfig, embedded_text
    from ppn_bayes.data import save_tokens
    from ppn_bayes.fit import fit
    from ppn_bayes.lm import save_lm
    from ppn_bayes.deploy.artifacts import export_masks
    from ppn_bayes.deploy.resize import export_ranked, resize

    root = tmp_path_factory.mktemp("bad_inputs")
    text = embedded_text()[:6000]
    tokenizer = CharTokenizer.for_text(embedded_text())
    vocab = tokenizer.vocab_size
    lm = tiny_lm("llama", vocab_size=vocab)  # 256 positions
    p = {"root": root, "vocab": vocab}
    p["model"] = save_lm(lm, tokenizer, root / "model")
    p["hf_model"] = save_lm(tiny_lm("llama", vocab_size=vocab), _hf_tokenizer(tokenizer.alphabet), root / "hf_model")
    (root / "train.txt").write_text(text)
    p["text"] = root / "train.txt"
    tokens = torch.tensor(tokenizer.encode(text))
    p["tokens"] = save_tokens(root / "tokens.safetensors", tokens)
    p["oov"] = save_tokens(root / "oov.safetensors", torch.cat([tokens[:100], torch.tensor([vocab + 5])]))
    p["negative"] = save_tokens(root / "negative.safetensors", torch.cat([tokens[:100], torch.tensor([-1])]))
    from safetensors.torch import save_file

    save_file({"tokens": tokens.float()}, root / "float.safetensors")
    save_file({"tokens": tokens[:100].view(10, 10)}, root / "matrix.safetensors")
    save_file({"ids": tokens}, root / "nokey.safetensors")
    raw = p["tokens"].read_bytes()
    (root / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (root / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "empty.txt").write_text("  \n\n ")
    (root / "afile").write_text("a file\n")
    (root / "adir").mkdir()
    (root / "folder.safetensors").mkdir()
    (root / "adir" / "something").write_text("x")

    fit_dir = root / "fit"
    config = FitConfig(steps=1, batch_size=2, seq_len=16, mlp_group=32, log_every=1)
    fit(lm, tokens, config, checkpoint=fit_dir / "checkpoint", tokenizer=tokenizer, progress=False)
    p["fit_dir"] = fit_dir
    p["fit"] = fit_dir / "checkpoint"
    p["ranked"] = export_ranked(p["fit"], root / "ranked")
    resize(p["ranked"], 0.5, root / "sub")
    p["sub"] = root / "sub"
    export_masks(p["fit"], root / "masks.json", sizes=[0.5])
    p["masks"] = root / "masks.json"
    (root / "masks_truncated.json").write_text(p["masks"].read_text()[:200])
    (root / "masks_other.json").write_text(json.dumps({"format": "something else"}))

    # Corrupt copies of the model, the fit and the ranked checkpoint.
    def corrupt(name, source, file, content):
        shutil.copytree(source, root / name)
        (root / name / file).write_text(content)
        p[name] = root / name

    config_text = (p["model"] / "config.json").read_text()
    corrupt("config_truncated", p["model"], "config.json", config_text[: len(config_text) // 2])
    corrupt("config_unknown_type", p["model"], "config.json", json.dumps({"model_type": "no-such-model"}))
    corrupt("config_list", p["model"], "config.json", "[1, 2, 3]")
    corrupt("config_no_type", p["model"], "config.json", json.dumps({"hidden_size": 32}))
    corrupt("tokenizer_truncated", p["model"], "char_tokenizer.json", '{"alph')
    corrupt("tokenizer_no_alphabet", p["model"], "char_tokenizer.json", '{"letters": "abc"}')
    corrupt("hf_tokenizer_truncated", p["hf_model"], "tokenizer.json", '{"version": "1.0", "trunc')
    corrupt("fit_state_truncated", p["fit"], "state.json", '{"format": ')
    corrupt("fit_state_other", p["fit"], "state.json", json.dumps({"format": "not a checkpoint"}))
    corrupt("ranked_index_edited", p["ranked"], "ranked.json",
            (p["ranked"] / "ranked.json").read_text().replace('"format_version": 1', '"format_version": 99'))
    import gguf  # a GGUF file's header: 256 positions, the char vocabulary; and a truncated copy

    writer = gguf.GGUFWriter(str(root / "header.gguf"), "llama")
    writer.add_context_length(256)
    writer.add_token_list(list(tokenizer.alphabet))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (root / "truncated.gguf").write_bytes((root / "header.gguf").read_bytes()[:60])
    shutil.copytree(p["model"], root / "model_no_config")
    (root / "model_no_config" / "config.json").unlink()
    p["model_no_config"] = root / "model_no_config"
    # A resume target: a fit folder whose checkpoint was fitted from the char-level model.
    shutil.copytree(fit_dir, root / "fit_resume")
    p["fit_resume"] = root / "fit_resume"
    return p


def _snapshot(*folders: Path) -> dict:
    """Every path under ``folders`` with its mode, and for files their size and modification
    time (a folder's time changes when the writability probe is made and removed)."""
    seen = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                stat = path.lstat()
                is_dir = path.is_dir() and not path.is_symlink()
                seen[str(path)] = (stat.st_mode,) if is_dir else (stat.st_size, stat.st_mode, stat.st_mtime_ns)
    return seen


def _line_ok(err: str, command: str, expect: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"want one line, got {len(lines)}:\n{err}"
    assert lines[0].startswith(f"ppn-bayes {command}: error: "), lines[0]
    assert expect.lower() in lines[0].lower(), f"{expect!r} not in {lines[0]!r}"


# -- the table ------------------------------------------------------------------------------------
# (command line with {placeholders}, expected words of the error line). {out}, {out2} are absent
# paths in the case's own folder; {afile} an existing file, {adir} an existing folder, {unwritable}
# a place nothing can be created in.
UNWRITABLE = "/proc/ppn-bayes-test/out"

FIT = "fit --model {model} --data {tokens} --out {out} --steps 1 --batch-size 2 --seq-len 16 --mlp-group 32 --quiet"
FIT_CASES = [
    ("fit --model {root}/nothing --data {tokens} --out {out}", "does not exist"),
    ("fit --model {afile} --data {tokens} --out {out}", "none of"),
    ("fit --model {model_no_config} --data {tokens} --out {out}", "none of"),
    ("fit --model {config_truncated} --data {tokens} --out {out}", "not valid JSON"),
    ("fit --model {config_unknown_type} --data {tokens} --out {out}", "not a valid model config"),
    ("fit --model {config_list} --data {tokens} --out {out}", "does not hold a JSON object"),
    ("fit --model {config_no_type} --data {tokens} --out {out}", "not a valid model config"),
    ("fit --model {tokenizer_truncated} --data {tokens} --out {out}", "not valid JSON"),
    ("fit --model {tokenizer_no_alphabet} --data {tokens} --out {out}", "no 'alphabet'"),
    ("fit --model {hf_tokenizer_truncated} --data {tokens} --out {out}", "not valid JSON"),
    ("fit --model {root}/truncated.gguf --data {tokens} --out {out}", "not a readable GGUF file"),
    ("fit --model {root}/nothing.gguf --data {tokens} --out {out}", "does not exist"),
    ("fit --model {root}/header.gguf --data {oov} --out {out}", "outside the LM's vocabulary"),
    ("fit --model {root}/header.gguf --data {tokens} --out {out} --seq-len 300", "above the 256 positions"),
    ("fit --model {fit} --data {tokens} --out {out}", "is a fit checkpoint, not a Hugging Face directory"),
    ("fit --model {ranked} --data {tokens} --out {out}", "is a ranked checkpoint"),
    ("fit --model {sub} --data {tokens} --out {out}", "is a sub-network"),
    ("fit --model {model} --data {root}/nothing.txt --out {out}", "no data file at"),
    ("fit --model {model} --data {root}/binary.txt --out {out}", "binary.txt is not UTF-8 text"),
    ("fit --model {model} --data {root}/empty.txt --out {out}", "holds no text"),
    ("fit --model {model} --data {root}/truncated.safetensors --out {out}", "truncated.safetensors is not a readable"),
    ("fit --model {model} --data {root}/garbage.safetensors --out {out}", "garbage.safetensors is not a readable"),
    ("fit --model {model} --data {oov} --out {out}", "outside the LM's vocabulary"),
    ("fit --model {model} --data {negative} --out {out}", "outside the LM's vocabulary"),
    ("fit --model {model} --data {root}/float.safetensors --out {out}", "integer token ids"),
    ("fit --model {model} --data {root}/matrix.safetensors --out {out}", "1-D tensor"),
    ("fit --model {model} --data {root}/nokey.safetensors --out {out}", "named 'tokens'"),
    ("fit --model {model} --data {adir} --out {out} --eval-data {root}/nothing.txt", "--eval-data: no data file"),
    ("fit --model {model} --data {tokens} --out {out} --eval-data {oov}", "--eval-data"),
    ("fit --model {model} --data {tokens} --out {afile}", "is a file, not a folder"),
    ("fit --model {model} --data {tokens} --out {afile}/run", "is a file, not a folder"),
    ("fit --model {model} --data {tokens} --out " + UNWRITABLE, "cannot write"),
    ("fit --model {model} --data {tokens} --out {fit_dir}", "pass --resume"),
    ("fit --model {model} --data {tokens} --out {out} --resume", "no checkpoint to resume"),
    ("fit --model {hf_model} --data {tokens} --out {fit_resume} --resume", "another model"),
    ("fit --model {model} --data {tokens} --out {out} --device bogus", "not a torch device"),
    ("fit --model {model} --data {tokens} --out {out} --device cuda", "CUDA is not available"),
    ("fit --model {model} --data {tokens} --out {out} --device cuda:3", "CUDA is not available"),
    ("fit --model {model} --data {tokens} --out {out} --device mps", "--device mps"),
    ("fit --model {model} --data {tokens} --out {out} --seq-len 100000", "above the 256 positions"),
    ("fit --model {model} --data {tokens} --out {out} --seq-len 257", "above the 256 positions"),
    ("fit --model {model} --data {tokens} --out {out} --seq-len 1", "seq_len must be at least 2"),
    ("fit --model {model} --data {tokens} --out {out} --grad-clip nan", "not a finite number"),
    ("fit --model {model} --data {tokens} --out {out} --grad-clip -1", "grad_clip must not be negative"),
    ("fit --model {model} --data {tokens} --out {out} --distill-weight nan", "not a finite number"),
    ("fit --model {model} --data {tokens} --out {out} --distill-weight inf", "not a finite number"),
    ("fit --model {model} --data {tokens} --out {out} --init-scale -1", "init_scale must be positive"),
    ("fit --model {model} --data {tokens} --out {out} --init-scale 0", "init_scale must be positive"),
    ("fit --model {model} --data {tokens} --out {out} --layer-init nan", "not a finite number"),
    ("fit --model {model} --data {tokens} --out {out} --layer-init=-inf", "not a finite number"),
    ("fit --model {model} --data {tokens} --out {out} --lr-lm nan", "not a finite number"),
    ("fit --model {model} --data {tokens} --out {out} --lr-guide 0", "lr_guide must be positive"),
    ("fit --model {model} --data {tokens} --out {out} --prior-weight -0.5", "prior_weight must not be negative"),
    ("fit --model {model} --data {tokens} --out {out} --init-jitter infinity", "not a finite number"),
    ("fit --model {model} --data {tokens} --out {out} --temperature 0", "temperature must be positive"),
    ("fit --model {model} --data {tokens} --out {out} --weight-decay=-1e-3", "weight_decay must not be negative"),
    ("fit --model {model} --data {tokens} --out {out} --size-min 0", "0 < size_min"),
    ("fit --model {model} --data {tokens} --out {out} --size-min 0.5 --size-max 0.4", "0 < size_min"),
    ("fit --model {model} --data {tokens} --out {out} --size-max 1.5", "0 < size_min"),
    ("fit --model {model} --data {tokens} --out {out} --size-min nan", "not a finite number"),
    ("fit --model {model} --data {tokens} --out {out} --steps 0", "steps must be positive"),
    ("fit --model {model} --data {tokens} --out {out} --steps 2.5", "invalid int value"),
    ("fit --model {model} --data {tokens} --out {out} --batch-size 0", "batch_size must be positive"),
    ("fit --model {model} --data {tokens} --out {out} --accumulate 0", "accumulate must be positive"),
    ("fit --model {model} --data {tokens} --out {out} --mlp-group 0", "mlp_group must be positive"),
    ("fit --model {model} --data {tokens} --out {out} --log-every 0", "log_every must be positive"),
    ("fit --model {model} --data {tokens} --out {out} --eval-windows 0", "eval_windows must be positive"),
    ("fit --model {model} --data {tokens} --out {out} --checkpoint-every -1", "checkpoint_every must not be negative"),
    ("fit --model {model} --data {tokens} --out {out} --prior-tokens 0", "prior_tokens must be positive"),
    ("fit --model {model} --data {tokens} --out {out} --parallel bogus", "parallel must be"),
    ("fit --model {model} --data {tokens} --out {out} --teacher bogus", "teacher must be"),
    ("fit --model {model} --data {tokens} --out {out} --gate-coupling bogus", "gate_coupling must be"),
    ("fit --model {model} --data {tokens} --out {out} --posterior bogus", "posterior must be"),
    ("fit --model {model} --data {tokens} --out {out} --dtype float16", "invalid choice"),
    ("fit --model {model} --data {tokens}", "required: --out"),
    ("fit --model {model} --data {tokens} --out {out} --no-such-flag", "unrecognized arguments"),
]

DEMO_CASES = [
    ("demo --out {afile}", "is a file, not a folder"),
    ("demo --out {afile}/demo", "is a file, not a folder"),
    ("demo --out " + UNWRITABLE, "cannot write"),
    ("demo --out {adir}", "exists and is not empty"),
    ("demo --out {out} --sizes 0", "sizes must lie in (0, 1]"),
    ("demo --out {out} --sizes nan", "finite number"),
    ("demo --out {out} --sizes 1.5", "sizes must lie in (0, 1]"),
    ("demo --out {out} --fit-steps 0", "steps must be positive"),
    ("demo --out {out} --eval-windows 0", "eval_windows"),
    ("demo --out {out} --pretrain-steps -1", "pretrain_steps"),
    ("demo --out {out} --model {root}/nothing", "does not exist"),
    ("demo --out {out} --model {config_truncated}", "not valid JSON"),
    ("demo --out {out} --text {root}/nothing.txt", "no data file"),
    ("demo --out {out} --text {root}/binary.txt", "not UTF-8 text"),
]

TEACHER = "teacher-text --model {model} --data {tokens} --tokens 100 --prompt-len 8 --new-tokens 8"
TEACHER_CASES = [
    (TEACHER + " --out {adir}", "exists; pass --resume"),
    (TEACHER + " --out {out}.safetensors --resume", "--resume continues a token store folder"),
    (TEACHER + " --out {root}/folder.safetensors", "is a folder, not a file"),
    (TEACHER + " --out {tokens}", "exists; pass --overwrite"),
    (TEACHER + " --out {afile}/x.safetensors", "is a file, not a folder"),
    (TEACHER + " --out /proc/ppn-bayes-test/x.safetensors", "cannot write"),
    (TEACHER + " --out {out}.safetensors --tokens 0", "--tokens must be positive"),
    (TEACHER + " --out {out}.safetensors --prompt-len 0", "--prompt-len must be positive"),
    (TEACHER + " --out {out}.safetensors --new-tokens -1", "--new-tokens must be positive"),
    (TEACHER + " --out {out}.safetensors --batch-size 0", "--batch-size must be positive"),
    (TEACHER + " --out {out}.safetensors --temperature 0", "--temperature must be positive"),
    (TEACHER + " --out {out}.safetensors --temperature nan", "--temperature must be positive"),
    (TEACHER + " --out {out}.safetensors --top-k -1", "--top-k must not be negative"),
    (TEACHER + " --out {out}.safetensors --device bogus", "not a torch device"),
    (TEACHER + " --out {out}.safetensors --new-tokens 300", "above the 256 positions"),
    ("teacher-text --model {root}/nothing --data {tokens} --tokens 10 --out {out}.safetensors", "does not exist"),
    ("teacher-text --model {model} --data {oov} --tokens 10 --out {out}.safetensors", "vocabulary"),
    ("teacher-text --model {model} --data {root}/nothing.txt --tokens 10 --out {out}.safetensors", "no data file"),
]

SUMMARIZE_CASES = [
    ("summarize {root}/nothing --out {out}", "does not exist"),
    ("summarize {fit_dir} --out {out}", "give " + "{fit}"),
    ("summarize {ranked} --out {out}", "is a ranked checkpoint, not a fit checkpoint"),
    ("summarize {model} --out {out}", "is a Hugging Face directory, not a fit checkpoint"),
    ("summarize {fit_state_truncated} --out {out}", "not valid JSON"),
    ("summarize {fit_state_other} --out {out}", "not a ppn_bayes checkpoint"),
    ("summarize {fit} --out {adir}", "exists; pass --overwrite"),
    ("summarize {fit} --out {afile}", "is a file, not a folder"),
    ("summarize {fit} --out {afile} --overwrite", "is a file, not a folder"),
    ("summarize {fit} --out " + UNWRITABLE, "cannot write"),
    ("summarize {fit} --out {out} --sizes 0", "sizes must lie in (0, 1]"),
    ("summarize {fit} --out {out} --size nan", "not a finite number"),
    ("summarize {fit} --out {out} --table-sizes 2", "sizes must lie in (0, 1]"),
    ("summarize {fit} --out {out} --draws 0", "not a positive integer"),
    ("summarize {fit} --out {out} --hdi-prob 1", "not a number in (0, 1)"),
    ("summarize {fit} --out {out} --low 0.9 --high 0.1", "must be below --high"),
    ("summarize {fit} --out {out} --low -0.1", "not a number in [0, 1]"),
]

MASKS_CASES = [
    ("masks {fit} --out {out}.json", "at least one size"),
    ("masks {fit} --out {out}.json --sizes 0", "sizes must lie in (0, 1]"),
    ("masks {fit} --out {out}.json --sizes nan", "not a finite number"),
    ("masks {fit} --out {out}.json --params 0", "not a positive integer"),
    ("masks {fit} --out {masks} --sizes 0.5", "exists; pass --overwrite"),
    ("masks {fit} --out {adir} --sizes 0.5", "is a folder, not a file"),
    ("masks {fit} --out {adir} --sizes 0.5 --overwrite", "is a folder, not a file"),
    ("masks {fit} --out /proc/ppn-bayes-test/m.json --sizes 0.5", "cannot write"),
    ("masks {fit} --out {afile}/m.json --sizes 0.5", "is a file, not a folder"),
    ("masks {root}/nothing --out {out}.json --sizes 0.5", "does not exist"),
    ("masks {model} --out {out}.json --sizes 0.5", "is a Hugging Face directory, not a fit or ranked checkpoint"),
    ("masks {sub} --out {out}.json --sizes 0.5", "is a sub-network"),
    ("masks {fit_dir} --out {out}.json --sizes 0.5", "give {fit}"),
    ("masks {ranked_index_edited} --out {out}.json --sizes 0.5", "ranked checkpoint version 99"),
]

EXPORT_CASES = [
    ("export-ranked {ranked} --out {out}", "is a ranked checkpoint, not a fit checkpoint"),
    ("export-ranked {root}/nothing --out {out}", "does not exist"),
    ("export-ranked {fit} --out {adir}", "exists; pass --overwrite"),
    ("export-ranked {fit} --out {afile}", "is a file, not a folder"),
    ("export-ranked {fit} --out {afile}/r", "is a file, not a folder"),
    ("export-ranked {fit_dir} --out {out}", "give {fit}"),
    ("export-ranked {fit_state_other} --out {out}", "not a ppn_bayes checkpoint"),
    ("export-ranked {fit} --out " + UNWRITABLE, "cannot write"),
]

RESIZE_CASES = [
    ("resize {ranked} --out {out}", "one of the arguments --size --params is required"),
    ("resize {ranked} --out {out} --size 0", "sizes must lie in (0, 1]"),
    ("resize {ranked} --out {out} --size 1.5", "sizes must lie in (0, 1]"),
    ("resize {ranked} --out {out} --size nan", "not a finite number"),
    ("resize {ranked} --out {out} --params -5", "not a positive integer"),
    ("resize {ranked} --out {out} --size 0.5 --params 10", "not allowed with argument"),
    ("resize {ranked} --out {adir} --size 0.5", "exists; pass --overwrite"),
    ("resize {ranked} --out {afile} --size 0.5 --overwrite", "is a file, not a folder"),
    ("resize {model} --out {out} --size 0.5", "is a Hugging Face directory"),
    ("resize {root}/nothing --out {out} --size 0.5", "does not exist"),
    ("resize {fit} --out {out} --size 0.5 --keep-ranked {adir}", "--keep-ranked"),
    ("resize {ranked} --out {out} --size 0.5 --keep-ranked {out2}", "--keep-ranked is for a fit checkpoint"),
    ("resize {fit} --out {out} --size 0.5 --keep-ranked {out}", "different folders"),
    ("resize {ranked_index_edited} --out {out} --size 0.5", "ranked checkpoint version 99"),
    ("resize {ranked} --out {out} --size 0.5 --dtype int8", "invalid choice"),
]

DISTILL = "distill {fit} --size 0.5 --data {tokens} --steps 1 --batch-size 2 --seq-len 16 --quiet"
DISTILL_CASES = [
    (DISTILL + " --out {out} --steps 0", "not a positive integer"),
    (DISTILL + " --out {out} --batch-size 0", "not a positive integer"),
    (DISTILL + " --out {out} --seq-len 100000", "above the 256 positions"),
    (DISTILL + " --out {out} --lr 0", "not a positive number"),
    (DISTILL + " --out {out} --lr nan", "not a finite number"),
    (DISTILL + " --out {out} --distill-weight nan", "not a finite number"),
    (DISTILL + " --out {out} --grad-clip nan", "not a finite number"),
    (DISTILL + " --out {out} --grad-clip -1", "not a non-negative number"),
    (DISTILL + " --out {out} --weight-decay inf", "not a finite number"),
    (DISTILL + " --out {out} --eval-windows 0", "not a positive integer"),
    (DISTILL + " --out {out} --log-every 0", "not a positive integer"),
    (DISTILL + " --out {out} --checkpoint-every -1", "not a non-negative integer"),
    (DISTILL + " --out {out} --device bogus", "not a torch device"),
    (DISTILL + " --out {out} --bf16", "--bf16"),
    (DISTILL + " --out {out} --resume", "no distill checkpoint to resume"),
    (DISTILL + " --out {adir}", "exists; pass --overwrite"),
    (DISTILL + " --out {afile} --overwrite", "is a file, not a folder"),
    (DISTILL + " --out {out} --teacher {root}/nothing", "--teacher"),
    (DISTILL + " --out {out} --eval-data {root}/nothing.txt", "--eval-data: no data file"),
    (DISTILL + " --out {out} --eval-data {root}/binary.txt", "not UTF-8 text"),
    ("distill {fit} --size 0.5 --data {oov} --out {out}", "vocabulary"),
    ("distill {fit} --size 0.5 --data {root}/truncated.safetensors --out {out}", "not a readable"),
    ("distill {fit} --size 0.5 --data {root}/nothing.txt --out {out}", "no data file"),
    ("distill {model} --size 0.5 --data {tokens} --out {out}", "is a Hugging Face directory"),
    ("distill {sub} --size 0.5 --data {tokens} --out {out}", "is a sub-network"),
    ("distill {fit_dir} --size 0.5 --data {tokens} --out {out}", "give {fit}"),
    ("distill {fit} --data {tokens} --out {out}", "one of the arguments --size --params is required"),
]

EVAL = "eval {model} --data {tokens} --seq-len 16 --quiet"
EVAL_CASES = [
    (EVAL + " --limit 0", "not a positive integer"),
    (EVAL + " --limit -1", "not a positive integer"),
    (EVAL + " --batch-size 0", "not a positive integer"),
    (EVAL + " --seq-len 1", "at least 2"),
    (EVAL + " --seq-len 100000", "above the 256 positions"),
    (EVAL + " --seq-len abc", "not an integer"),
    (EVAL + " --device bogus", "not a torch device"),
    (EVAL + " --device cuda", "CUDA is not available"),
    (EVAL + " --dtype float64", "invalid choice"),
    (EVAL + " --masks {masks}", "needs --size or --params"),
    (EVAL + " --masks {root}/nothing.json --size 0.5", "no mask file"),
    (EVAL + " --masks {root}/masks_truncated.json --size 0.5", "not valid JSON"),
    (EVAL + " --masks {root}/masks_other.json --size 0.5", "not a ppn_bayes mask file"),
    (EVAL + " --size 0", "sizes must lie in (0, 1]"),
    (EVAL + " --params 0", "not a positive integer"),
    ("eval {root}/nothing --data {tokens}", "does not exist"),
    ("eval {fit_dir} --data {tokens}", "give {fit}"),
    ("eval {config_truncated} --data {tokens}", "not valid JSON"),
    ("eval {config_unknown_type} --data {tokens}", "not a valid model config"),
    ("eval {tokenizer_truncated} --data {tokens}", "not valid JSON"),
    ("eval {hf_tokenizer_truncated} --data {tokens}", "not valid JSON"),
    ("eval {model} --data {root}/nothing.txt", "no data file"),
    ("eval {root}/truncated.gguf --data {tokens}", "not a readable GGUF file"),
    ("eval {root}/header.gguf --data {tokens} --seq-len 100000", "above the 256 positions"),
    ("eval {root}/header.gguf --data {tokens} --seq-len 16 --size 0.5", "holds no ranking"),
    ("eval {model} --data {root}/binary.txt", "binary.txt is not UTF-8 text"),
    ("eval {model} --data {root}/empty.txt", "holds no text"),
    ("eval {model} --data {oov}", "outside the LM's vocabulary"),
    ("eval {model} --data {root}/truncated.safetensors", "not a readable"),
    ("eval {model} --data {root}/float.safetensors", "integer token ids"),
    ("eval {model} --data {tokens} --seq-len 16 --size 0.5", "holds no ranking"),
    ("eval {sub} --data {tokens} --seq-len 16 --size 0.5", "already a sub-network"),
    ("eval {ranked} --data {tokens} --seq-len 16", "give --size or --params"),
]

SPECULATE = "speculate {ranked} --data {tokens} --prompt-len 8 --max-new-tokens 4 --ks 2 --sizes 0.5"
SPECULATE_CASES = [
    (SPECULATE + " --sizes 0", "sizes must lie in (0, 1]"),
    (SPECULATE + " --ks 0", "not a positive integer"),
    (SPECULATE + " --n-prompts 0", "not a positive integer"),
    (SPECULATE + " --prompt-len 0", "not a positive integer"),
    (SPECULATE + " --max-new-tokens 0", "not a positive integer"),
    (SPECULATE + " --repeats 0", "not a positive integer"),
    (SPECULATE + " --max-new-tokens 300", "above the 256 positions"),
    (SPECULATE + " --device bogus", "not a torch device"),
    (SPECULATE + " --out {adir}", "is a folder, not a file"),
    (SPECULATE + " --out {afile}", "exists; pass --overwrite"),
    (SPECULATE + " --prompt-file {afile}", "not allowed with argument"),
    ("speculate {ranked} --sizes 0.5", "one of the arguments --prompt-file --data is required"),
    ("speculate {ranked} --prompt-file {root}/nothing.txt", "no data file"),
    ("speculate {ranked} --prompt-file {root}/binary.txt", "not UTF-8 text"),
    ("speculate {ranked} --data {root}/nothing.txt", "no data file"),
    ("speculate {ranked} --data {oov}", "vocabulary"),
    ("speculate {root}/nothing --data {tokens}", "does not exist"),
    ("speculate {fit_dir} --data {tokens}", "give {fit}"),
    ("speculate {model} --data {tokens}", "holds no ranking"),
    ("speculate {sub} --data {tokens}", "sub-network"),
    ("speculate {model} --data {tokens} --masks {root}/masks_truncated.json", "not valid JSON"),
]

CASES = [*FIT_CASES, *DEMO_CASES, *TEACHER_CASES, *SUMMARIZE_CASES, *MASKS_CASES, *EXPORT_CASES, *RESIZE_CASES,
         *DISTILL_CASES, *EVAL_CASES, *SPECULATE_CASES]


def test_the_table_has_at_least_150_cases():
    assert len(CASES) >= 150 and len({line for line, _ in CASES}) == len(CASES)


def _fill(template: str, fx: dict, case_dir: Path) -> str:
    names = {k: str(v) for k, v in fx.items()}
    names.update(out=str(case_dir / "out"), out2=str(case_dir / "out2"), afile=str(fx["root"] / "afile"),
                 adir=str(fx["root"] / "adir"))
    return template.format(**names)


@pytest.mark.parametrize("line, expect", CASES, ids=[line for line, _ in CASES])
def test_bad_input(line, expect, fx, tmp_path, capsys):
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    argv = _fill(line, fx, case_dir).split()
    before = _snapshot(fx["root"], case_dir)
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    _line_ok(captured.err, argv[0], _fill(expect, fx, case_dir))
    assert captured.out == ""
    assert _snapshot(fx["root"], case_dir) == before, "something was written"


# -- tracebacks, --debug, bugs -------------------------------------------------------------------------
def test_a_real_process_prints_one_line_and_no_traceback_and_debug_shows_it(fx, tmp_path):
    argv = _fill("masks {fit} --sizes 0.5 --out /proc/ppn-bayes-test/m.json", fx, tmp_path).split()
    done = subprocess.run([sys.executable, "-m", "ppn_bayes", *argv], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    _line_ok(done.stderr, "masks", "cannot write")
    with pytest.raises(PermissionError, match="cannot write"):  # --debug: the exception, so its traceback
        main([*argv, "--debug"])


def test_a_bug_is_one_line_asking_for_debug_with_exit_status_1(fx, tmp_path, capsys, monkeypatch):
    import ppn_bayes.cli.deploy as deploy

    def broken(args):
        raise TypeError("an internal mistake")

    argv = _fill("export-ranked {fit} --out {out}", fx, tmp_path).split()
    monkeypatch.setattr(deploy, "_export", broken)
    assert main(argv) == 1
    err = capsys.readouterr().err
    _line_ok(err, "export-ranked", "unexpected TypeError: an internal mistake")
    assert "--debug" in err
    with pytest.raises(TypeError, match="internal mistake"):
        main(["--debug", *argv])


# -- the reproductions of issue 17 -------------------------------------------------------------------------
def test_issue17_3_fit_refuses_an_unusable_out_before_training(fx, tmp_path, capsys):
    """Item 3: `--out` naming a file or an unwritable place was first touched at the first
    save, after training, and the fit was lost with a traceback."""
    for out in (fx["root"] / "afile", fx["root"] / "afile" / "run", Path(UNWRITABLE)):
        line = _fill(FIT, fx, tmp_path).split()
        line[line.index("--out") + 1] = str(out)
        assert main(line) == 2
        err = capsys.readouterr().err
        _line_ok(err, "fit", str(out) if out != Path(UNWRITABLE) else "cannot write")


@pytest.mark.parametrize("line, expect", [
    ("fit --model {model} --data {tokens} --out {out} --device bogus", "not a torch device"),
    ("fit --model {model} --data {root}/truncated.safetensors --out {out}", "not a readable"),
    ("fit --model {model} --data {oov} --out {out}", "vocabulary"),
    ("eval {model} --data {oov} --seq-len 16", "vocabulary"),
    ("eval {model} --data {tokens} --seq-len 16 --limit 0", "positive integer"),
    ("eval {model} --data {tokens} --seq-len 16 --batch-size 0", "positive integer"),
    ("eval {config_unknown_type} --data {tokens} --seq-len 16", "config"),
    ("eval {tokenizer_truncated} --data {tokens} --seq-len 16", "char_tokenizer.json"),
    ("masks {fit} --sizes 0.5 --out /proc/ppn-bayes-test/m.json", "cannot write"),
])
def test_issue17_4_errors_of_every_class_are_one_line(line, expect, fx, tmp_path, capsys):
    """Item 4: RuntimeError, SafetensorError, IndexError, ZeroDivisionError, KeyError and
    OSError escaped as tracebacks."""
    assert main(_fill(line, fx, tmp_path).split()) == 2
    _line_ok(capsys.readouterr().err, line.split()[0], expect)


def test_issue17_5_every_float_setting_refuses_nan_and_infinity():
    """Item 5: NaN passed the "must not be negative" checks; --init-scale -1 gave "math
    domain error"; --init-scale and --layer-init were not checked."""
    import dataclasses

    from ppn_bayes import FitConfig
    from ppn_bayes.demo import DemoConfig
    from ppn_bayes.deploy.finetune import DistillConfig

    for cls in (FitConfig, DistillConfig, DemoConfig):
        floats = [f.name for f in dataclasses.fields(cls) if isinstance(getattr(cls(), f.name), float)]
        assert floats or cls is DemoConfig
        for name in floats:
            for bad in (float("nan"), float("inf"), float("-inf")):
                with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                    cls(**{name: bad})
    with pytest.raises(ValueError, match="sizes must be a finite number"):
        DemoConfig(sizes=(0.5, float("nan")))
    for value in (-1.0, 0.0):
        with pytest.raises(ValueError, match="init_scale must be positive"):
            FitConfig(init_scale=value)
    with pytest.raises(ValueError, match="steps must be"):
        FitConfig(steps=True)


def _crashing_writer(path: Path, text: str, die_at: int) -> subprocess.CompletedProcess:
    """Replace ``path`` by a folder holding ``v`` = ``text`` in another process that is
    killed (``os._exit``) after its ``die_at``-th rename (0: while writing; 1: finished,
    renamed to ``.NAME.PID.*.new``; 2: between the two renames of the replacement; 3:
    before the old one is removed)."""
    script = f"""
import importlib.util, os
from pathlib import Path
spec = importlib.util.spec_from_file_location("io_alone", {str(ROOT / "ppn_bayes" / "io.py")!r})
io = importlib.util.module_from_spec(spec)  # ppn_bayes.io alone: no torch to import
spec.loader.exec_module(io)
real, calls = os.replace, []
def replace(a, b):
    real(a, b)
    calls.append(b)
    if len(calls) == {die_at}:
        os._exit(9)
io.os.replace = replace
with io.atomic_directory(Path({str(path)!r}), overwrite=True) as tmp:
    (tmp / "v").write_text({text!r})
    (tmp / "big").write_bytes(b"x" * 1000)
    if {die_at} == 0:
        os._exit(9)
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("die_at, newest", [(0, "one"), (1, "two"), (2, "two"), (3, "two")])
def test_issue17_6_7_a_checkpoint_killed_at_any_point_recovers_to_the_newest_complete_one(tmp_path, die_at,
                                                                                          newest):
    """Items 6 and 7: a killed write left `.checkpoint.*.tmp/` for good; a crash between
    the two renames left only `.checkpoint.old` and "nothing to resume"."""
    from ppn_bayes.io import atomic_directory, recover_directory

    path = tmp_path / "checkpoint"
    with atomic_directory(path) as tmp:
        (tmp / "v").write_text("one")
    done = _crashing_writer(path, "two", die_at)
    assert done.returncode == 9, done.stderr
    recover_directory(path)
    assert (path / "v").read_text() == newest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    # And a later write after a crash leaves nothing behind either.
    _crashing_writer(path, "three", 0)
    with atomic_directory(path, overwrite=True) as tmp:
        (tmp / "v").write_text("four")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_issue17_6_stale_temporaries_of_older_versions_are_removed_but_not_a_live_writers(tmp_path):
    from ppn_bayes.io import recover_directory

    path = tmp_path / "checkpoint"
    path.mkdir()
    (tmp_path / ".checkpoint.abcd_123.tmp").mkdir()  # an older version's temporary, no process id
    (tmp_path / ".checkpoint.999999999.abcdefgh.tmp").mkdir()  # a process that is gone
    (tmp_path / ".checkpoint.distill.abcdefgh.tmp").mkdir()  # not ours: another name
    recover_directory(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.distill.abcdefgh.tmp", "checkpoint"]
    live = tmp_path / f".checkpoint.{os.getpid()}.abcdefgh.tmp"
    live.mkdir()
    recover_directory(path)
    assert live.is_dir()


def test_issue17_7_every_file_and_folder_is_flushed(tmp_path, monkeypatch):
    import ppn_bayes.io as io

    flushed = []
    real = os.fsync

    def fsync(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)
    with io.atomic_directory(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("x")
    io.atomic_write_text(tmp_path / "t.json", "{}")
    names = {Path(p).name for p in flushed}
    assert {"f", "sub", tmp_path.name} <= names  # the file, its folder, and the folder renamed into
    assert any(name.startswith(".t.json.") for name in names)  # the text file before its rename
    assert flushed.count(str(tmp_path)) >= 3


def test_issue17_8_overwrite_onto_a_file_leaves_no_old(tmp_path):
    """Item 8: `--overwrite` onto a regular file left `.NAME.old`."""
    from ppn_bayes.io import atomic_directory

    target = tmp_path / "out"
    target.write_text("a file")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "x").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "x").read_text() == "y"


def test_issue17_8_checkpoint_tensors_and_json_have_the_same_plain_modes(fx):
    """Item 8: checkpoint tensors were 0600 beside 0644 JSON."""
    umask = os.umask(0)
    os.umask(umask)
    for folder in (fx["fit"], fx["ranked"], fx["sub"]):
        for path in [folder, *folder.rglob("*")]:
            want = (0o777 if path.is_dir() else 0o666) & ~umask
            assert path.stat().st_mode & 0o777 == want, path


def test_issue17_8_quiet_silences_the_libraries_loading_bars(fx, capsys):
    """Item 8 (and issue 16): --quiet left transformers' loading bars."""
    line = _fill("eval {model} --data {tokens} --seq-len 16 --limit 2 --json", fx, fx["root"]).split()
    assert main(line) == 0
    loud = capsys.readouterr().err
    assert main([*line, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "Loading weights" in loud and captured.err == ""
    record = json.loads(captured.out)
    # Issue 16: `tokens` counts the tokens evaluated, not the file's.
    assert record["tokens"] == record["windows"] * 16 == 2 * 16
    assert record["file_tokens"] == 6000 > 32


def test_issue16_gguf_loading_bar_is_silenced_by_quiet():
    import importlib

    from ppn_bayes.cli import quiet_libraries

    loader = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    original = loader.tqdm
    with quiet_libraries(True):
        bar = loader.tqdm(range(3))
        assert bar.disable
        bar.close()
    assert importlib.import_module("transformers.modeling_gguf_pytorch_utils").tqdm is original


def test_issue17_7_fit_resume_finds_a_checkpoint_killed_between_its_renames(fx, tmp_path):
    """Item 7 through the CLI: only `.checkpoint.old` left; `fit --resume` finds it (the
    checks before the fit rename it back) instead of "nothing to resume"."""
    from ppn_bayes.cli import build_parser
    from ppn_bayes.cli.checks import check_command

    run = tmp_path / "run"
    shutil.copytree(fx["fit_dir"], run)
    os.replace(run / "checkpoint", run / ".checkpoint.old")
    argv = _fill(FIT, fx, tmp_path).split()
    argv[argv.index("--out") + 1] = str(run)
    check_command(build_parser().parse_args([*argv, "--resume"]))
    assert (run / "checkpoint" / "state.json").is_file() and not (run / ".checkpoint.old").exists()
