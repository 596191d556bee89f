"""Running an LM: generation with a static KV cache (:mod:`.generation`), speculative
decoding with a sub-network as the draft (:mod:`.speculative`), and text the LM writes
itself for training (:mod:`.lm_text`).

Nothing is imported here; none of these modules needs pyro.
"""
