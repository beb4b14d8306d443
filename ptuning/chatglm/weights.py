"""Original ChatGLM weights -> ``GlmForCausalLM`` safetensors, one source shard in memory at a time."""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

from ..errors import UserError
from .detect import read_json


LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "encoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}


def source_shards(path: str) -> list[str]:
    """The weight files of an original checkpoint, in index order (safetensors preferred over .bin)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            data = read_json(index)
            if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
                raise UserError(f"{index}: not a weight index (no 'weight_map')")
            files = list(dict.fromkeys(data["weight_map"].values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise UserError(f"{index}: shard {missing[0]} is missing from {path}")
            return [os.path.join(path, f) for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise UserError(f"{path}: no model.safetensors / pytorch_model*.bin weights (nor an index) in this directory")


def convert_tensors(state: dict, config, where: str, multi_query: bool = True) -> tuple[dict, dict]:
    """One shard's tensors under GlmForCausalLM names, and any ``prefix_encoder.*`` tensors (ChatGLM names)."""
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    out, prefix = {}, {}
    for key in list(state):
        tensor = state.pop(key)  # drop our reference as we go: the shard's memory is released tensor by tensor
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith(".weight_scale") or tensor.dtype in (torch.int8, torch.uint8):
            raise UserError(f"{where}: {key} is quantized (int4/int8 original); convert the full-precision checkpoint")
        if name == "rotary_pos_emb.inv_freq":
            continue  # recomputed by GlmRotaryEmbedding
        if name.startswith("prefix_encoder."):
            prefix[name] = tensor
            continue
        if name in RENAMES:
            out[RENAMES[name]] = tensor
            continue
        match = LAYER.fullmatch(name)
        if not match:
            raise UserError(f"{where}: unexpected tensor {key!r}; not an original ChatGLM2/3/GLM-4 checkpoint")
        layer, rest = match.groups()
        target = f"model.layers.{layer}."
        if rest in LAYER_RENAMES:
            out[target + LAYER_RENAMES[rest]] = tensor
        elif rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = rest.rsplit(".", 1)[1]
            if not multi_query:
                # without multi-query attention the fused rows are per head: [q_h | k_h | v_h] for h in heads
                grouped = tensor.reshape(heads, 3, hd, *tensor.shape[1:])
                q, k, v = (grouped[:, i].reshape(heads * hd, *tensor.shape[1:]).contiguous() for i in range(3))
            else:
                q, k, v = tensor.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=0)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                out[f"{target}self_attn.{proj}.{kind}"] = part.contiguous()
        else:
            raise UserError(f"{where}: unexpected tensor {key!r}; not an original ChatGLM2/3/GLM-4 checkpoint")
    return out, prefix


def convert_weights(path: str, config, out_dir: str, multi_query: bool = True) -> dict:
    """Write ``model-*.safetensors`` (+ index), one source shard in memory at a time; returns prefix tensors."""
    from ..interop import read_tensor_file

    shards = source_shards(path)
    expected = expected_shapes(config)
    seen, weight_map, prefix, total = {}, {}, {}, 0
    for i, shard in enumerate(shards, 1):
        state = read_tensor_file(shard)
        converted, shard_prefix = convert_tensors(state, config, shard, multi_query)
        del state
        prefix.update(shard_prefix)
        for name, tensor in converted.items():
            if name not in expected:
                raise UserError(f"{shard}: {name} has no place in the converted model (layer index out of range?)")
            if tuple(tensor.shape) != expected[name]:
                raise UserError(f"{shard}: {name} has shape {tuple(tensor.shape)}, the config implies {expected[name]}")
            seen[name] = shard
        file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        if converted:
            save_file(converted, os.path.join(out_dir, file), metadata={"format": "pt"})
            weight_map.update({name: file for name in converted})
            total += sum(t.numel() * t.element_size() for t in converted.values())
        del converted
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise UserError(f"{path}: weights missing from the checkpoint: {', '.join(missing[:3])}"
                        f"{' ...' if len(missing) > 3 else ''}")
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                      indent=2)
    return prefix


def expected_shapes(config) -> dict:
    """Parameter names and shapes of GlmForCausalLM(config), built on the meta device (no memory)."""
    from transformers import GlmForCausalLM
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}
