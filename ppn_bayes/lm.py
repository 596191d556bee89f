"""Loading and building LMs: local Hugging Face directories, GGUF files, tiny test LMs.

Nothing here touches a model hub: paths must be local.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .data import CharTokenizer
from .io import FileFormatError, atomic_directory

__all__ = ["load_lm", "save_lm", "tiny_llama", "load_tokenizer", "vocab_rows", "check_same_vocabulary"]



def vocab_rows(lm: nn.Module) -> int | None:
    """Rows of ``lm``'s output embedding (its vocabulary as the logits see it), or None."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return None if weight is None else int(weight.shape[0])


def check_same_vocabulary(reference: nn.Module, other: nn.Module, *, names: tuple[str, str], why: str) -> None:
    """Raise ``ValueError`` unless the two LMs have the same vocabulary size (config
    ``vocab_size`` and output rows); ``names`` say what the two are, ``why`` why it matters."""
    sizes = []
    for name, lm in zip(names, (reference, other)):
        config = getattr(lm, "config", None)
        if config is None:
            raise TypeError(f"the {name} ({type(lm).__name__}) has no config: pass a Hugging Face causal LM")
        sizes.append((getattr(config, "vocab_size", None), vocab_rows(lm)))
    if sizes[0] != sizes[1]:
        raise ValueError(f"the {names[1]}'s vocabulary (vocab_size, output rows) {sizes[1]} differs from the "
                         f"{names[0]}'s {sizes[0]}: {why}")

def tiny_llama(vocab_size: int, *, layers: int = 4, hidden: int = 64, heads: int = 4,
               kv_heads: int = 2, intermediate: int = 256, seed: int = 0, **overrides) -> nn.Module:
    """A small randomly initialised ``LlamaForCausalLM`` built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


#: What a loader of third-party files raises for a file that is corrupt, truncated or of an
#: unknown kind (transformers and tokenizers raise all of these, the Rust side plain
#: ``Exception``): turned into a :class:`~ppn_bayes.io.FileFormatError` naming the path.
_LOAD_ERRORS = (Exception,)


def _unreadable(what: str, path: Path, err: BaseException) -> FileFormatError:
    reason = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError):
        reason = f"missing or unknown {err}"
    return FileFormatError(f"{what} at {path} does not load ({type(err).__name__}: {reason})")


def load_tokenizer(directory: str | Path):
    """The tokenizer saved in ``directory``: a :class:`~ppn_bayes.data.CharTokenizer` or a
    Hugging Face one; a corrupt file gives a :class:`~ppn_bayes.io.FileFormatError`."""
    directory = Path(directory)
    try:
        if (directory / "char_tokenizer.json").is_file():
            return CharTokenizer.from_pretrained(directory)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    except _LOAD_ERRORS as err:
        raise _unreadable("the tokenizer", directory, err) from err


def _plain_copy(lm: nn.Module) -> nn.Module:
    """A GGUF-loaded LM is marked quantised; rebuild a plain one from config and weights."""
    from transformers import AutoModelForCausalLM

    config = lm.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=next(lm.parameters()).dtype)
    plain.load_state_dict(lm.state_dict())
    return plain.eval()


def load_lm(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(lm, tokenizer)`` from a local Hugging Face directory or a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        try:
            lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except _LOAD_ERRORS as err:
            raise _unreadable("the GGUF file", path, err) from err
        lm = _plain_copy(lm)
    elif path.is_dir() and (path / "config.json").is_file():
        try:
            lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        except _LOAD_ERRORS as err:
            raise _unreadable("the LM", path, err) from err
        tokenizer = load_tokenizer(path)
    else:
        raise FileNotFoundError(
            f"{path} is neither a Hugging Face model directory (with config.json) nor a .gguf file"
        )
    return lm.to(device).eval(), tokenizer


def save_lm(lm: nn.Module, tokenizer, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Save ``lm`` (safetensors) and its tokenizer to ``directory``, atomically."""
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        lm.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)
