"""Shared fixtures: tiny LMs built from configs, the embedded text, SmolLM2 when present."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Tiny models: one thread is faster than two, and steadier on a loaded machine.
torch.set_num_threads(1)


def tiny_config(family: str, **overrides):
    """A tiny config of ``family`` (llama, mistral, qwen2, qwen3, gpt2) with GQA where the
    family has it."""
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "gpt2":
        kwargs = dict(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=256, n_inner=128,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        kwargs.update(overrides)
        return tf.GPT2Config(**kwargs)
    classes = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config}
    kwargs = {**common, **overrides}
    if family == "qwen3":
        kwargs.setdefault("head_dim", 8)
    return classes[family](**kwargs)


def tiny_lm(family: str = "llama", seed: int = 0, **overrides):
    """A tiny randomly initialised causal LM of ``family`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of SmolLM2-135M (GGUF); skips when ../shared/tools/smollm2 is absent."""
    tool = SHARED / "tools" / "smollm2"
    if not tool.exists():
        pytest.skip("../shared/tools/smollm2 is absent")
    try:
        out = subprocess.run([str(tool)], check=True, capture_output=True, text=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as err:
        pytest.skip(f"SmolLM2 could not be fetched: {err}")
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def shared_data():
    data = SHARED / "data"
    if not data.exists():
        pytest.skip("../shared/data is absent")
    return data


def idle_layers_of(lm, masks) -> list[int]:
    """The kept layers a sub-network leaves out, by their definition: no unit, and no bias on
    the attention and MLP output projections (GPT-2 has them); the first stays when all would go."""
    biased = any(name.endswith(("c_proj.bias", "o_proj.bias", "down_proj.bias")) for name, _ in lm.named_parameters())
    kept = masks.layer.nonzero().flatten().tolist()
    idle = [] if biased else [l for l in kept if not masks.unit[l].any()]
    return idle if len(idle) < len(kept) else idle[1:]


def expected_params(lm, masks) -> int:
    """``masks.kept_params`` less the idle layers' own parameters (their norms)."""
    layer_cost, _ = masks.arch.costs(dtype=torch.int64)
    return masks.kept_params - int(sum(layer_cost[l] for l in idle_layers_of(lm, masks)))
