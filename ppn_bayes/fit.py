"""The fit's public names, where they have always been imported from.

The fit itself lives in :mod:`ppn_bayes.train`: the loop (:func:`~ppn_bayes.train.loop.fit`),
one step (:func:`~ppn_bayes.train.step.train_step`), the state it holds and its checkpoints.
"""

from .train import FitResult, PuppetFit, StepLoss, fit, load_fit, read_state, save_checkpoint, versions

__all__ = ["fit", "FitResult", "PuppetFit", "StepLoss", "load_fit", "save_checkpoint", "read_state", "versions"]
