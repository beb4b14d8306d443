"""The ``GlmConfig`` that computes the same function as an original ChatGLM ``config.json``."""

from __future__ import annotations

import os

import torch

from ..errors import UserError
from .detect import generation, read_config, rope_scaling


def glm_config(path: str, raw: dict | None = None):
    """The ``GlmConfig`` computing the same function as the original config; refuses what it cannot express."""
    from transformers import GlmConfig

    raw = raw if raw is not None else read_config(path)
    config_file = os.path.join(path, "config.json")
    gen = generation(path, raw)
    refusals = [
        (not raw.get("rmsnorm", True), "rmsnorm=false (LayerNorm)"),
        (raw.get("add_bias_linear", False), "add_bias_linear=true (biased dense / MLP layers)"),
        (raw.get("apply_residual_connection_post_layernorm", False),
         "apply_residual_connection_post_layernorm=true (residual taken after the norm)"),
        (not raw.get("post_layer_norm", True), "post_layer_norm=false (no final norm)"),
    ]
    for refused, what in refusals:
        if refused:
            raise UserError(f"{config_file}: {what} cannot be expressed by GlmForCausalLM; not converted")
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "padded_vocab_size"):
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or raw[key] <= 0:
            raise UserError(f"{config_file}: {key!r} is missing or not a positive integer; not a complete "
                            "ChatGLM2/3/GLM-4 config")
    heads = raw["num_attention_heads"]
    head_dim = raw.get("kv_channels") or raw["hidden_size"] // heads
    kv_heads = raw.get("multi_query_group_num", 1) if raw.get("multi_query_attention", False) else heads
    ratio = float(raw.get("rope_ratio", 1) or 1)
    scaling = rope_scaling(path, raw, gen)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if scaling == "base":
        rope["rope_theta"] = 10000.0 * ratio
    elif scaling == "linear":
        rope.update(rope_type="linear", factor=ratio)
    eos = raw.get("eos_token_id", 2)
    pad = raw.get("pad_token_id", 0)
    config = GlmConfig(
        vocab_size=raw["padded_vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["ffn_hidden_size"], num_hidden_layers=raw["num_layers"],
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act="silu",
        attention_dropout=0.0, max_position_embeddings=raw.get("seq_length", 8192),
        rms_norm_eps=raw.get("layernorm_epsilon", 1e-5), tie_word_embeddings=False,
        attention_bias=bool(raw.get("add_qkv_bias", False)), pad_token_id=pad, eos_token_id=eos,
        bos_token_id=None, rope_parameters=rope, architectures=["GlmForCausalLM"],
    )
    config.dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(raw.get("torch_dtype"), torch.float32)
    return config, gen
