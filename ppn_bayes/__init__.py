"""ppn_bayes: push puppet networks, structured Bayesian pruning of language models.

One fit of the gate posterior yields a sub-network of any requested size.
"""

__version__ = "0.1.0"

from .architecture import Architecture, UnsupportedModelError, describe  # noqa: E402
from .config import FitConfig  # noqa: E402
from .data import CharTokenizer, TokenBlocks, embedded_text, load_tokens, tokenize  # noqa: E402
from .evaluate import Perplexity, perplexity  # noqa: E402
from .fit import FitResult, PuppetFit, fit, load_fit  # noqa: E402
from .gating import GatedLM, Gates  # noqa: E402
from .lm import load_lm, save_lm, tiny_llama  # noqa: E402
from .model import PuppetGuide, PuppetModel  # noqa: E402
from .ranking import Masks, Ranking  # noqa: E402

__all__ = [
    "Architecture", "CharTokenizer", "FitConfig", "FitResult", "GatedLM", "Gates", "Masks",
    "Perplexity", "PuppetFit", "PuppetGuide", "PuppetModel", "Ranking", "TokenBlocks",
    "UnsupportedModelError", "describe", "embedded_text", "fit", "load_fit", "load_lm",
    "load_tokens", "perplexity", "save_lm", "tiny_llama", "tokenize",
]
