"""Everything a command reads or writes, checked before any work: one place, one call.

:func:`check_command` runs before every subcommand (from :func:`ppn_bayes.cli.main`): the
device, every input path (present, of the right kind, readable: model configs and
tokenizer files, checkpoints, mask files, token and text files), every output location
(writable, a folder where a folder is needed, absent unless ``--overwrite`` or
``--resume``), and the numbers that depend on the model (``--seq-len`` against its
maximum positions, token ids against its vocabulary), all from small JSON files and file
headers, so that bad input is refused in seconds rather than after the weights have loaded.
Each check raises ``ValueError`` / ``OSError`` naming the argument and the path; the
CLI's boundary turns that into one line.
"""

from __future__ import annotations

import argparse
import codecs
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..io import FileFormatError, recover_directory

__all__ = ["check_command", "check_device", "check_output_dir", "check_output_file", "check_data",
           "check_checkpoint", "check_seq_len", "model_info", "ModelInfo"]

_TEXT_CHUNK = 1 << 24  # bytes decoded at a time when a text file is checked


# -- the device ------------------------------------------------------------------------------
def check_device(name: str, what: str = "--device") -> None:
    """Refuse a device this torch cannot use (an unknown name, CUDA on a CPU-only build or
    without a GPU, an index past the last GPU) before anything is loaded."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"{what} {name!r} is not a torch device ({err})") from None
    if device.type == "cpu" or device.type == "meta":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"{what} {name}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {name}: there are only {torch.cuda.device_count()} GPU(s)")
        return
    try:
        torch.empty(1, device=device)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise ValueError(f"{what} {name}: this device is not available ({' '.join(str(err).split())})") from None


# -- outputs -----------------------------------------------------------------------------------
def _check_writable(path: Path, what: str) -> None:
    """The nearest existing folder above ``path`` must be a folder we can create files in;
    tried by creating (and removing) an empty probe file, which also catches a read-only
    file system and permissions that ``os.access`` misjudges (root)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{what} {path}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ppn-bayes-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"{what} {path}: cannot write in {parent} ({err.strerror or err})") from None


def check_output_dir(path, *, overwrite: bool = False, what: str = "--out", may_exist: bool = False) -> Path:
    """A folder the command will write: not a file, absent unless ``overwrite`` (or
    ``may_exist``), in a place we can write to."""
    path = Path(path)
    recover_directory(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise FileExistsError(f"{what} {path} is a file, not a folder")
        if not (overwrite or may_exist):
            raise FileExistsError(f"{what} {path} exists; pass --overwrite to replace it")
        _check_writable(path / "x", what)
    _check_writable(path, what)
    return path


def check_output_file(path, *, overwrite: bool = False, what: str = "--out", suffix: str | None = None) -> Path:
    """A file the command will write: not a folder, absent unless ``overwrite``, of the
    given ``suffix``, in a place we can write to."""
    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise ValueError(f"{what} {path}: the file must end in {suffix}")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{what} {path} exists; pass --overwrite to replace it")
    _check_writable(path, what)
    return path


# -- models --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What the checks need of a model, read from its small files only."""

    path: Path
    kind: str  # as ppn_bayes.deploy.artifacts.checkpoint_kind
    max_positions: int | None = None
    vocab_size: int | None = None
    config: dict | None = None  # the LM's config.json (None for a .gguf file)
    char_tokenizer: bool = False


def _json_object(path: Path, what: str) -> dict:
    from ..io import read_json

    return read_json(path, what)


def _hf_config(directory: Path, what: str) -> dict:
    """The config of a Hugging Face directory, checked by transformers (a corrupt file gives
    a clear error here, not a KeyError deep in the loader)."""
    data = _json_object(directory / "config.json", what)
    try:
        from transformers import AutoConfig

        AutoConfig.for_model(**data) if "model_type" in data else AutoConfig.from_pretrained(str(directory))
    except Exception as err:  # noqa: BLE001 - any failure of transformers here means a bad file
        raise FileFormatError(f"{what}: {directory / 'config.json'} is not a valid model config "
                              f"({type(err).__name__}: {' '.join(str(err).split())})") from None
    return data


def _check_tokenizer_files(directory: Path, what: str) -> bool:
    """Tokenizer files that are JSON must parse; returns whether the tokenizer is a
    :class:`~ppn_bayes.data.CharTokenizer`."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "char_tokenizer.json"):
        if (directory / name).exists():
            _json_object(directory / name, f"{what} (tokenizer)")
    char = directory / "char_tokenizer.json"
    if char.exists() and not isinstance(_json_object(char, what).get("alphabet"), str):
        raise FileFormatError(f"{what}: {char} has no 'alphabet'")
    return char.exists()


def _positions(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


#: struct formats of GGUF's scalar value types (8 is a string, 9 an array).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def _gguf_metadata(path: Path) -> dict | None:
    """The key-value metadata of a GGUF file (version 2 or 3, little-endian), read from
    its header alone: scalars and strings as they are, arrays as their length. None for a
    file this reader does not know (a big-endian one, say): the loader then decides."""
    import mmap
    import struct

    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError("it does not start with GGUF")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
        if not 2 <= version <= 3:
            return None
        pos, meta = 24, {}

        def string(pos: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", data, pos)
            if pos + 8 + n > len(data):
                raise ValueError("it is truncated")
            return bytes(data[pos + 8:pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n

        def value(kind: int, pos: int):
            if kind == 8:
                return string(pos)
            if kind == 9:
                element, count = struct.unpack_from("<IQ", data, pos)
                pos += 12
                if element == 8:
                    for _ in range(count):
                        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
                elif element in _GGUF_SCALARS:
                    pos += struct.calcsize(_GGUF_SCALARS[element]) * count
                else:
                    raise ValueError(f"an array of value type {element}")
                return count, pos
            if kind not in _GGUF_SCALARS:
                raise ValueError(f"an unknown value type {kind}")
            return struct.unpack_from(_GGUF_SCALARS[kind], data, pos)[0], pos + struct.calcsize(_GGUF_SCALARS[kind])

        for _ in range(n_kv):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", data, pos)
            meta[key], pos = value(kind, pos + 4)
    return meta


def _gguf_info(path: Path, what: str) -> tuple[int | None, int | None]:
    """(context length, vocabulary size) from a GGUF file's header, or Nones."""
    import struct

    try:
        meta = _gguf_metadata(path)
    except (ValueError, struct.error, OSError) as err:
        raise FileFormatError(f"{what}: {path} is not a readable GGUF file ({err})") from None
    if meta is None:
        return None, None
    arch = meta.get("general.architecture", "")
    positions, vocab = meta.get(f"{arch}.context_length"), meta.get(f"{arch}.vocab_size")
    vocab = vocab if isinstance(vocab, int) else meta.get("tokenizer.ggml.tokens")
    return (positions if isinstance(positions, int) else None), (vocab if isinstance(vocab, int) else None)


def _not_a_folder_of(path: Path, what: str) -> None:
    """Refuse the folder of a fit (or of a demo) given where its checkpoint is meant."""
    inner = path / "checkpoint"
    if path.is_dir() and not (path / "state.json").exists() and (inner / "state.json").is_file():
        raise FileNotFoundError(f"{what} {path} is the folder of a fit, not a checkpoint: give {inner}")


def model_info(path, what: str, kinds: tuple[str, ...] | None = None) -> ModelInfo:
    """Check that ``path`` is a model ppn_bayes reads (of one of ``kinds``, when given) and
    return what its small files say: its kind, maximum positions and vocabulary."""
    from ..deploy.artifacts import checkpoint_kind
    from ..deploy.resize import open_ranked

    path = Path(path)
    recover_directory(path)
    if not (path.exists() or path.is_symlink()):
        raise FileNotFoundError(f"{what} {path} does not exist")
    _not_a_folder_of(path, what)
    kind = checkpoint_kind(path)
    if kinds is not None and kind not in kinds:
        names = {"fit": "a fit checkpoint", "ranked": "a ranked checkpoint", "hf": "a Hugging Face directory",
                 "gguf": "a .gguf file", "subnetwork": "a sub-network"}
        wanted = (f"a {' or '.join(kinds)} checkpoint" if set(kinds) <= {"fit", "ranked"}
                  else " or ".join(names[k] for k in kinds))
        raise ValueError(f"{what} {path} is {names[kind]}, not {wanted}")
    if kind == "gguf":
        positions, vocab = _gguf_info(path, what)
        return ModelInfo(path, kind, positions, vocab)
    if kind == "ranked":
        ranked = open_ranked(path)
        config = ranked.config.to_dict() if hasattr(ranked.config, "to_dict") else dict(ranked.config)
        char = _check_tokenizer_files(path / "tokenizer", what) if (path / "tokenizer").is_dir() else False
        return ModelInfo(path, kind, _positions(config), config.get("vocab_size"), config, char)
    if kind == "fit":
        from ..train import read_state

        read_state(path)
        lm_dir = path / "lm"
        if not (lm_dir / "model.safetensors").is_file():
            raise FileFormatError(f"{what} {path}: lm/model.safetensors is missing")
        config = _hf_config(lm_dir, what)
        char = _check_tokenizer_files(lm_dir, what)
        return ModelInfo(path, kind, _positions(config), config.get("vocab_size"), config, char)
    config = _hf_config(path, what)
    char = _check_tokenizer_files(path, what)
    return ModelInfo(path, kind, _positions(config), config.get("vocab_size"), config, char)


def check_checkpoint(path, what: str, kinds: tuple[str, ...]) -> ModelInfo:
    """A checkpoint to read: present (after :func:`~ppn_bayes.io.recover_directory`), of
    one of ``kinds``; the folder of a fit is refused with its checkpoint's name."""
    return model_info(path, what, kinds)


def check_seq_len(length: int, info: ModelInfo | None, what: str) -> None:
    """Refuse ``length`` tokens when the model has fewer positions."""
    if info is not None and info.max_positions is not None and length > info.max_positions:
        raise ValueError(f"{what} {length} is above the {info.max_positions} positions of {info.path}")


def _check_masks(path, what: str = "--masks") -> None:
    from ..deploy.maskfile import load_masks

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no mask file at {path}")
    load_masks(path)


# -- data ------------------------------------------------------------------------------------------
def _check_text(path: Path, what: str) -> None:
    """A text file must be UTF-8 and hold something other than white space."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    empty, offset = True, 0
    with open(path, "rb") as file:
        while True:
            chunk = file.read(_TEXT_CHUNK)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                raise ValueError(f"{what} {path} is not UTF-8 text (byte {offset + err.start}: {err.reason}); "
                                 "give a text file or a .safetensors token file") from None
            empty = empty and not text.strip()
            offset += len(chunk)
            if not chunk:
                break
    if empty:
        raise ValueError(f"{what} {path} holds no text")


def _check_token_file(path: Path, what: str, vocab: int | None) -> None:
    from safetensors import SafetensorError, safe_open

    from ..data import check_token_ids

    try:
        with safe_open(str(path), framework="pt") as file:
            if "tokens" not in file.keys():
                raise FileFormatError(f"{what} {path} must hold a 1-D tensor named 'tokens'")
            tokens = file.get_tensor("tokens")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise FileFormatError(f"{what} {path} is not a readable .safetensors file "
                              f"({' '.join(str(err).split())})") from None
    if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype.is_signed is None:
        raise FileFormatError(f"{what} {path} must hold a 1-D tensor of integer token ids named 'tokens'")
    if vocab is not None:
        check_token_ids(tokens, vocab, f"{what} {path}")


def check_data(paths, what: str, vocab: int | None = None) -> None:
    """Every data path present and readable: a ``.safetensors`` token file with a 1-D
    integer ``tokens`` tensor whose ids lie in the vocabulary, or UTF-8 text; a folder is
    left to its loader."""
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or []):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{what}: no data file at {path}")
        if path.is_dir():
            continue
        if not os.access(path, os.R_OK):
            raise PermissionError(f"{what} {path} cannot be read")
        if path.suffix == ".safetensors":
            _check_token_file(path, what, vocab)
        else:
            _check_text(path, what)


# -- per command ------------------------------------------------------------------------------------
def _positive(args: argparse.Namespace, *names: str) -> None:
    import math

    for name in names:
        value = getattr(args, name)
        if isinstance(value, float) and not math.isfinite(value) or not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _same_model(checkpoint: ModelInfo, model: ModelInfo) -> None:
    """A resumed fit must be given the model its checkpoint was fitted from."""
    where = f"--resume: the checkpoint {checkpoint.path} was fitted from another model than --model {model.path}"
    if checkpoint.char_tokenizer != model.char_tokenizer and model.kind != "gguf":
        kinds = ("a character tokenizer", "a Hugging Face tokenizer")
        raise ValueError(f"{where} (the checkpoint has {kinds[not checkpoint.char_tokenizer]}, --model "
                         f"{kinds[not model.char_tokenizer]})")
    if checkpoint.config is None or model.config is None:
        return
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "n_layer", "n_embd",
                "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        if checkpoint.config.get(key) != model.config.get(key):
            raise ValueError(f"{where} ({key} {checkpoint.config.get(key)!r} there, {model.config.get(key)!r} here)")


def _fit(args: argparse.Namespace) -> None:
    check_device(args.device)
    info = model_info(args.model, "--model", ("hf", "gguf"))
    check_seq_len(args.seq_len, info, "--seq-len")
    from ..store import parse_sources

    paths, weights = parse_sources(args.data)
    for path, weight in zip(paths, weights or []):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--data: the weight of {path} must be a finite number >= 0, got {weight}")
    if weights is not None and not sum(weights) > 0:
        raise ValueError(f"--data: the mixing weights sum to {sum(weights)}; at least one must be positive")
    check_data(paths, "--data", info.vocab_size)
    if getattr(args, "eval_data", None):
        check_data(args.eval_data, "--eval-data", info.vocab_size)
    out = Path(args.out)
    check_output_dir(out, may_exist=True)
    checkpoint = out / "checkpoint"
    recover_directory(checkpoint)
    if args.resume:
        if not (checkpoint / "state.json").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume at {checkpoint}")
        _same_model(model_info(checkpoint, "--resume", ("fit",)), info)
    elif checkpoint.exists():
        raise FileExistsError(f"{checkpoint} exists; pass --resume to continue it")
    if (out / "result.json").is_dir():
        raise IsADirectoryError(f"--out {out}: result.json is a folder")


def _demo(args: argparse.Namespace) -> None:
    out = check_output_dir(args.out, may_exist=True)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace its files")
    if args.model is not None:
        from ..demo import DemoConfig

        info = model_info(args.model, "--model", ("hf", "gguf"))
        check_seq_len(DemoConfig().fit.seq_len, info, "the demo's sequence length")
    if args.text is not None:
        check_data(args.text, "--text")


def _teacher_text(args: argparse.Namespace) -> None:
    _positive(args, "tokens", "prompt_len", "new_tokens", "batch_size", "temperature")
    if args.top_k < 0:
        raise ValueError(f"--top-k must not be negative, got {args.top_k}")
    check_device(args.device)
    out = Path(args.out)
    if out.suffix == ".safetensors":  # one token file, written at once
        if args.resume:
            raise ValueError(f"--resume continues a token store folder; --out {out} is a single .safetensors file")
        check_output_file(out, overwrite=args.overwrite, suffix=".safetensors")
    else:  # a token store: an absent or empty folder, or one to --resume or --overwrite
        if out.is_dir() and any(out.iterdir()) and not (args.resume or args.overwrite):
            raise FileExistsError(f"--out {out} exists; pass --resume to continue it or --overwrite to replace it")
        check_output_dir(out, overwrite=args.overwrite, may_exist=True)
    info = model_info(args.model, "--model", ("hf", "gguf"))
    check_seq_len(args.prompt_len + args.new_tokens, info, "--prompt-len + --new-tokens")
    check_data(args.data, "--data", info.vocab_size)


def _summarize(args: argparse.Namespace) -> None:
    if not args.low < args.high:
        raise ValueError(f"--low {args.low} must be below --high {args.high}")
    check_output_dir(args.out, overwrite=args.overwrite)
    check_checkpoint(args.checkpoint, "CHECKPOINT", ("fit",))


def _masks(args: argparse.Namespace) -> None:
    if not args.sizes and not args.params:
        raise ValueError("ask for at least one size (--sizes) or parameter count (--params)")
    check_output_file(args.out, overwrite=args.overwrite)
    check_checkpoint(args.checkpoint, "CHECKPOINT", ("fit", "ranked"))


def _export(args: argparse.Namespace) -> None:
    check_output_dir(args.out, overwrite=args.overwrite)
    check_checkpoint(args.checkpoint, "CHECKPOINT", ("fit",))


def _resize(args: argparse.Namespace) -> None:
    check_output_dir(args.out, overwrite=args.overwrite)
    if args.keep_ranked is not None:
        if Path(args.keep_ranked).resolve() == Path(args.out).resolve():
            raise ValueError("--keep-ranked and --out must be different folders")
        check_output_dir(args.keep_ranked, overwrite=args.overwrite, what="--keep-ranked")
    info = check_checkpoint(args.checkpoint, "CHECKPOINT", ("fit", "ranked"))
    if args.keep_ranked is not None and info.kind != "fit":
        raise ValueError("--keep-ranked is for a fit checkpoint; CHECKPOINT is already ranked")


def _distill(args: argparse.Namespace) -> None:
    check_device(args.device)
    if args.bf16 and not str(args.device).startswith("cuda"):
        raise ValueError("--bf16 autocast is for CUDA devices; on the CPU the fine-tune runs in float32")
    out = check_output_dir(args.out, overwrite=args.overwrite)
    work = out.with_name(out.name + ".distill-checkpoint")
    recover_directory(work)
    if args.resume and not (work / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no distill checkpoint to resume at {work}")
    if not args.resume and (args.checkpoint_every or args.stop_after is not None) and work.exists():
        raise FileExistsError(f"a distill checkpoint of an earlier run is at {work}: pass --resume to continue "
                              "it, or remove it")
    info = check_checkpoint(args.checkpoint, "CHECKPOINT", ("fit", "ranked"))
    teacher = model_info(args.teacher, "--teacher") if args.teacher is not None else None
    check_data(args.data, "--data", info.vocab_size)
    if args.eval_data is not None:
        check_data(args.eval_data, "--eval-data", info.vocab_size)
    for model in (info, teacher):
        check_seq_len(args.seq_len, model, "--seq-len")


def _eval(args: argparse.Namespace) -> None:
    check_device(args.device)
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.masks is not None and args.size is None and args.params is None:
        raise ValueError("--masks needs --size or --params to choose the mask")
    info = model_info(args.model, "MODEL")
    cut = args.size is not None or args.params is not None
    if info.kind in ("hf", "gguf") and cut and args.masks is None:
        raise ValueError(f"MODEL {info.path} holds no ranking: pass a mask file (--masks) to cut it")
    if info.kind == "subnetwork" and cut:
        raise ValueError(f"MODEL {info.path} is already a sub-network: it cannot be cut again")
    if args.masks is not None:
        _check_masks(args.masks)
    check_data(args.data, "--data", info.vocab_size)
    check_seq_len(args.seq_len, info, "--seq-len")


def _speculate(args: argparse.Namespace) -> None:
    check_device(args.device)
    if args.out is not None:
        check_output_file(args.out, overwrite=args.overwrite)
    info = model_info(args.checkpoint, "CHECKPOINT")
    if args.masks is not None:
        _check_masks(args.masks)
    if args.prompt_file is not None:
        check_data(args.prompt_file, "--prompt-file")
    else:
        check_seq_len(args.prompt_len + args.max_new_tokens + max(args.ks), info,
                      "--prompt-len + --max-new-tokens + the largest k")
        check_data(args.data, "--data", info.vocab_size)


_CHECKS = {"fit": _fit, "demo": _demo, "teacher-text": _teacher_text, "summarize": _summarize, "masks": _masks,
           "export-ranked": _export, "resize": _resize, "distill": _distill, "eval": _eval,
           "speculate": _speculate}


def check_command(args: argparse.Namespace) -> None:
    """The checks of ``args.command`` (none for a command without any)."""
    check = _CHECKS.get(args.command)
    if check is not None:
        check(args)
