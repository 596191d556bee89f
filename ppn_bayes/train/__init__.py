"""Training: the fit's loop (:mod:`.loop`), its step (:mod:`.step`), what it holds
(:mod:`.state`), its checkpoints (:mod:`.checkpoint`) and its seeds (:mod:`.seeds`)."""

from .checkpoint import read_state, recorded_size_rank, save_checkpoint, versions
from .loop import fit, load_fit
from .state import FitResult, FitState, PuppetFit
from .step import StepLoss, train_step

__all__ = ["fit", "load_fit", "FitResult", "FitState", "PuppetFit", "StepLoss", "train_step", "read_state",
           "recorded_size_rank", "save_checkpoint", "versions"]
