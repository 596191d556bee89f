"""Looking at what a fit gives: the posterior with ArviZ (:mod:`.posterior`), the masks over
the fit's evaluations (:mod:`.trajectory`), perplexity
(:mod:`.evaluate`, and of any model file: :mod:`.evaluate_file`), and the baselines a fit
is measured against (:mod:`.baselines`).

Nothing is imported here: :mod:`.posterior` needs pyro (and arviz), the others do not.
"""
