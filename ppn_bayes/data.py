"""Token blocks from local text or token files, with explicit seeds. Nothing is downloaded.

* :func:`load_tokens` reads a text file (tokenised with the given tokenizer) or a
  safetensors file holding a 1-D ``tokens`` tensor.
* :class:`TokenBlocks` cuts training batches (random windows, a pure function of the seed
  and the step, so a resumed fit sees the same data) and evaluation windows
  (non-overlapping, remainder dropped).
* :class:`CharTokenizer` and :func:`embedded_text` serve the embedded default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

__all__ = ["CharTokenizer", "TokenBlocks", "embedded_text", "load_tokens", "tokenize"]


def embedded_text() -> str:
    """The small synthetic text shipped with the package (``resources/corpus.txt``)."""
    return resources.files("ppn_bayes").joinpath("resources/corpus.txt").read_text()


class CharTokenizer:
    """A character tokenizer for the embedded default: one id per character of ``alphabet``."""

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError("alphabet must be a non-empty string of distinct characters")
        self.alphabet = alphabet
        self._ids = {c: i for i, c in enumerate(alphabet)}

    @classmethod
    def for_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the tokenizer's alphabet") from None

    def decode(self, ids) -> str:
        return "".join(self.alphabet[int(i)] for i in ids)

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory, "char_tokenizer.json").write_text(json.dumps({"alphabet": self.alphabet}))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CharTokenizer":
        return cls(json.loads(Path(directory, "char_tokenizer.json").read_text())["alphabet"])


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """The whole text as one ``[N]`` long tensor, no special tokens added."""
    if not text.strip():
        raise ValueError("the text is empty")
    ids = tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor(ids, dtype=torch.long)


def load_tokens(path: str | Path, tokenizer=None) -> torch.Tensor:
    """Tokens ``[N]`` from a ``.safetensors`` file (key ``tokens``) or a text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        if "tokens" not in tensors or tensors["tokens"].dim() != 1:
            raise ValueError(f"{path} must hold a 1-D tensor named 'tokens'")
        return tensors["tokens"].long()
    if tokenizer is None:
        raise ValueError(f"{path} is text: a tokenizer is needed to read it")
    return tokenize(path.read_text(encoding="utf-8"), tokenizer)


def check_token_ids(tokens: torch.Tensor, vocab: int, what: str = "the tokens") -> None:
    """Raise ``ValueError`` naming ``what`` when a token id falls outside ``[0, vocab)``."""
    if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab:
        raise ValueError(f"{what}: token ids outside the LM's vocabulary of {vocab}")


def check_token_path(path: str | Path) -> Path:
    """``path`` as a token file name (``.safetensors``), or a ValueError naming it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: token files end in .safetensors")
    return path


def save_tokens(path: str | Path, tokens: torch.Tensor, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tokens [N]`` as a safetensors file (key ``tokens``) that :func:`load_tokens`
    reads, through a temporary file and a rename; ``metadata`` goes into its header."""
    from safetensors.torch import save_file

    from .io import atomic_file

    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    path = check_token_path(path)
    with atomic_file(path) as tmp:
        save_file({"tokens": tokens.long().contiguous()}, tmp, metadata=metadata)
    return path


@dataclass(frozen=True)
class TokenBlocks:
    """Windows of ``seq_len`` tokens from one token stream ``tokens [N]``."""

    tokens: torch.Tensor
    seq_len: int
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.tokens.dim() != 1:
            raise ValueError(f"tokens must be one 1-D stream, got shape {tuple(self.tokens.shape)}")
        if self.tokens.numel() < self.seq_len:
            raise ValueError(
                f"the text has {self.tokens.numel()} tokens, fewer than one window of {self.seq_len}"
            )

    def batch(self, step: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Random windows ``[batch_size, seq_len]`` for ``step``; a pure function of
        ``(seed, step)``. Under several processes, each rank takes its own rows of the
        same global batch of ``batch_size * world_size`` windows."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        high = self.tokens.numel() - self.seq_len + 1
        starts = torch.randint(0, high, (batch_size * world_size,), generator=generator)
        starts = starts[rank * batch_size:(rank + 1) * batch_size]
        offsets = torch.arange(self.seq_len)
        return self.tokens[starts[:, None] + offsets]  # [B, T]

    def windows(self, limit: int | None = None) -> torch.Tensor:
        """Non-overlapping windows ``[W, seq_len]``, the remainder dropped."""
        n = self.tokens.numel() // self.seq_len
        if limit is not None:
            n = min(n, limit)
        return self.tokens[: n * self.seq_len].view(n, self.seq_len)

    def split(self, fraction: float) -> tuple["TokenBlocks", "TokenBlocks"]:
        """Two blocks: the first ``1 - fraction`` of the stream and the last ``fraction``."""
        cut = int(self.tokens.numel() * (1 - fraction))
        return (
            TokenBlocks(self.tokens[:cut], self.seq_len, self.seed),
            TokenBlocks(self.tokens[cut:], self.seq_len, self.seed),
        )
