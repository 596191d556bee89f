"""The method's mathematics: what is gated (:mod:`.architecture`, :mod:`.gating`), the
size of a sub-network (:mod:`.budget`), the Pyro model and guide (:mod:`.model`), the
objective (:mod:`.objective`), rankings and masks (:mod:`.ranking`), schedules
(:mod:`.schedule`) and the fit's configuration (:mod:`.config`).

Nothing is imported here: :mod:`.model` needs pyro, the others do not.
"""
