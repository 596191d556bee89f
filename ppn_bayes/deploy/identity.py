"""What identifies an LM: a hash of its tensors' names and shapes, and one of its first values.

Mask files and ranked checkpoints record it (``base_model``) so that masks are only ever
applied to the LM they were made for.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

__all__ = ["model_identity"]

_CONFIG_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "intermediate_size", "n_inner")


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def model_identity(lm: nn.Module) -> dict:
    """What identifies ``lm`` for a mask file.

    ``shapes_sha256`` hashes the names and shapes of every tensor of its state dict and
    the shape fields of its config: equal for the same model in any dtype or device.
    ``weights_sha256`` hashes the first 16 values of every tensor (as float32): it tells a
    fitted LM from its base model.
    """
    state = lm.state_dict()
    config = {k: getattr(lm.config, k, None) for k in _CONFIG_SHAPE_FIELDS}
    shapes = [[name, list(tensor.shape)] for name, tensor in sorted(state.items())]
    fingerprint = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        head = tensor.detach().flatten()[:16].to("cpu", torch.float32)
        fingerprint.update(name.encode())
        fingerprint.update(head.numpy().tobytes())
    return {
        "model_type": lm.config.model_type,
        "shapes_sha256": _sha256({"tensors": shapes, "config": config}),
        "weights_sha256": fingerprint.hexdigest(),
    }


