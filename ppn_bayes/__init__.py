"""ppn_bayes: push puppet networks, structured Bayesian pruning of language models.

One fit of the gate posterior yields a sub-network of any requested size.
"""

from .version import VERSION as __version__  # noqa: E402, F401

from .core.architecture import Architecture, UnsupportedModelError, describe  # noqa: E402
from .core.config import FitConfig  # noqa: E402
from .core.gating import GatedLM, Gates  # noqa: E402
from .core.ranking import Masks, Ranking, UntrainedSizeWarning  # noqa: E402
from .data import CharTokenizer, TokenBlocks, embedded_text, load_tokens, tokenize  # noqa: E402
from .deploy.maskfile import MaskFile, load_masks, save_masks  # noqa: E402
from .deploy.subnetwork import build_subnetwork, load_subnetwork, save_subnetwork  # noqa: E402
from .inspect.evaluate import Perplexity, perplexity  # noqa: E402
from .lm import load_lm, save_lm, tiny_llama  # noqa: E402

try:  # the fit needs pyro; without it (the GPU image) the pyro-free modules still import
    from .core.model import PuppetGuide, PuppetModel  # noqa: E402
    from .deploy.resize import export_ranked, resize  # noqa: E402
    # through the ppn_bayes.fit module, so that it is loaded before the name ``fit`` is bound
    # here: loaded later, Python would set ``ppn_bayes.fit`` to the module
    from .fit import FitResult, PuppetFit, fit, load_fit  # noqa: E402
except ModuleNotFoundError as err:
    if err.name != "pyro" and not (err.name or "").startswith("pyro."):
        raise

__all__ = [
    "Architecture", "CharTokenizer", "FitConfig", "FitResult", "GatedLM", "Gates", "MaskFile", "Masks",
    "Perplexity", "PuppetFit", "PuppetGuide", "PuppetModel", "Ranking", "TokenBlocks",
    "UnsupportedModelError", "UntrainedSizeWarning", "build_subnetwork", "describe", "embedded_text", "export_ranked", "fit",
    "load_fit", "load_lm", "load_masks", "load_subnetwork", "load_tokens", "perplexity", "resize",
    "save_lm", "save_masks", "save_subnetwork", "tiny_llama", "tokenize",
]
