"""From a ranking to a model one runs: sub-networks (:mod:`.subnetwork`), ranked checkpoints
and resizing (:mod:`.resize`), mask files (:mod:`.maskfile`), an LM's identity
(:mod:`.identity`), distillation of a cut model (:mod:`.finetune`) and opening any of
these from a path (:mod:`.artifacts`).

Nothing is imported here, so that the pyro-free modules import without pyro.
"""
