"""ppn_bayes: push puppet networks, structured Bayesian pruning of language models.

One fit of the gate posterior yields a sub-network of any requested size.
"""

from .version import VERSION as __version__  # noqa: E402

from .architecture import Architecture, UnsupportedModelError, describe  # noqa: E402
from .config import FitConfig  # noqa: E402
from .data import CharTokenizer, TokenBlocks, embedded_text, load_tokens, tokenize  # noqa: E402
from .evaluate import Perplexity, perplexity  # noqa: E402
from .gating import GatedLM, Gates  # noqa: E402
from .lm import load_lm, save_lm, tiny_llama  # noqa: E402
from .maskfile import MaskFile, load_masks, save_masks  # noqa: E402
from .ranking import Masks, Ranking  # noqa: E402
from .subnetwork import build_subnetwork, load_subnetwork, save_subnetwork  # noqa: E402

try:  # the fit needs pyro; without it (the GPU image) the pyro-free modules still import
    from .train import FitResult, PuppetFit, fit, load_fit  # noqa: E402
    from .model import PuppetGuide, PuppetModel  # noqa: E402
    from .resize import export_ranked, resize  # noqa: E402
except ModuleNotFoundError as err:
    if err.name != "pyro" and not (err.name or "").startswith("pyro."):
        raise

__all__ = [
    "Architecture", "CharTokenizer", "FitConfig", "FitResult", "GatedLM", "Gates", "MaskFile", "Masks",
    "Perplexity", "PuppetFit", "PuppetGuide", "PuppetModel", "Ranking", "TokenBlocks",
    "UnsupportedModelError", "build_subnetwork", "describe", "embedded_text", "export_ranked", "fit",
    "load_fit", "load_lm", "load_masks", "load_subnetwork", "load_tokens", "perplexity", "resize",
    "save_lm", "save_masks", "save_subnetwork", "tiny_llama", "tokenize",
]
