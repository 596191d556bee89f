"""Each model family's facts, asked of its :class:`~ppn_bayes.core.architecture.Family` entry,
checked against the modules transformers builds for that family."""

from __future__ import annotations

import torch
from conftest import tiny_lm

from ppn_bayes.core.architecture import FAMILIES, decoder_layers, describe, family_of, get_module


def test_q_k_v_rows_tile_the_projections_of_every_family(family):
    """Every output row of q, k and v belongs to exactly one attention unit's block."""
    lm = tiny_lm(family)
    arch, fam = describe(lm, mlp_group=16), family_of(lm)
    layer = decoder_layers(lm)[0]
    owner: dict[str, torch.Tensor] = {}
    for path, offset, rows in fam.qkv_rows(n_heads=arch.n_heads, head_dim=arch.head_dim,
                                           heads_per_unit=arch.heads_per_unit):
        width = fam.out_features(get_module(layer, path).weight)
        count = owner.setdefault(path, torch.zeros(width, dtype=torch.long))
        count[offset:offset + arch.n_attention_units * rows] += 1
    assert set(owner) == ({fam.q} if fam.fused_qkv else {fam.q, fam.k, fam.v})
    for path, count in owner.items():
        assert torch.equal(count, torch.ones_like(count)), f"{family} {path}: rows owned {count.unique().tolist()} times"
    outputs = fam.qkv_outputs(units=arch.n_attention_units, heads_per_unit=arch.heads_per_unit,
                              head_dim=arch.head_dim, n_heads=arch.n_heads)
    assert outputs == {path: len(count) for path, count in owner.items()}


def test_weight_layout_is_the_family_s(family):
    lm = tiny_lm(family)
    fam = family_of(lm)
    layer = decoder_layers(lm)[0]
    down = get_module(layer, fam.mlp_out)
    intermediate = (lm.config.n_inner or 4 * lm.config.n_embd) if family == "gpt2" else lm.config.intermediate_size
    assert fam.in_features(down.weight) == intermediate
    assert fam.out_features(down.weight) == lm.config.hidden_size
    assert fam.out_in(down.weight).shape == (lm.config.hidden_size, intermediate)


def test_only_gpt2_counts_heads_in_module_fields_and_scales_by_layer():
    llama, gpt2 = FAMILIES["llama"], FAMILIES["gpt2"]
    assert llama.attention_fields(heads=3, head_dim=8) == {}
    assert gpt2.attention_fields(heads=3, head_dim=8) == {"split_size": 24, "num_heads": 3}
    scaled, plain = tiny_lm("gpt2", scale_attn_by_inverse_layer_idx=True), tiny_lm("gpt2")
    assert gpt2.scales_attention_by_layer(scaled.config) and not gpt2.scales_attention_by_layer(plain.config)
    assert not llama.scales_attention_by_layer(scaled.config)  # the flag is GPT-2's, not Llama's
    assert gpt2.uniform_config_fields(plain.config, heads=plain.config.n_head, kv_heads=plain.config.n_head,
                                      intermediate=32, head_dim=8) == {"n_inner": 32}
    assert gpt2.uniform_config_fields(plain.config, heads=1, kv_heads=1, intermediate=32, head_dim=8) is None
    assert llama.uniform_config_fields(None, heads=2, kv_heads=1, intermediate=32, head_dim=8) == {
        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32, "head_dim": 8}
