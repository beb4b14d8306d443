"""Original ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B-chat checkpoints -> transformers' native ``GlmForCausalLM``.

The remote-code layout (``modeling_chatglm.py``, ``tokenization_chatglm.py``, ``pytorch_model-*.bin``) does not load
on transformers 5, but ``GlmForCausalLM`` computes the same function, so the checkpoint is converted once, offline:

- weights, one shard at a time (``torch.load(weights_only=True)`` or safetensors; no remote code is run), into
  sharded safetensors: the fused ``query_key_value`` splits ``[heads*hd | groups*hd | groups*hd]`` into q/k/v (per head
  ``[q|k|v]`` without multi-query attention), ``dense_h_to_4h`` is already ``gate_up_proj`` (``silu(first half) *
  second half``), ``rotary_pos_emb.inv_freq`` is dropped, a ``prefix_encoder`` goes through the P-tuning importer;
- the config: RMSNorm eps, ``multi_query_group_num`` kv heads, qkv bias, rotary on the first half of each head in
  interleaved pairs (``partial_rotary_factor`` 0.5), and ``rope_ratio`` the way the checkpoint's own
  ``modeling_chatglm.py`` uses it (read as text): ChatGLM3-32k/128k and GLM-4 multiply the base (theta = 10000 *
  rope_ratio), ChatGLM2-6B-32k divides the positions (linear scaling);
- the tokenizer: a fast tokenizer from ``tokenizer.model`` (sentencepiece for ChatGLM2/3, tiktoken ranks for GLM-4)
  with ChatGLM's special tokens at their original ids, the ``[gMASK]sop`` / ``[gMASK]<sop>`` prefix, left padding and
  a chat template that reproduces the original ``build_chat_input`` ids.

``resolve_model_path`` makes this transparent: an original ChatGLM directory given as ``--model_name_or_path`` is
converted once into a cache directory (``$PTUNING_CACHE`` or ``~/.cache/ptuning/chatglm``) and reused afterwards.
"""

from .config import glm_config
from .convert import CACHE_ENV, MARKER, cache_root, convert_model, resolve_model_path
from .detect import generation, is_original_chatglm, read_config, rope_scaling
from .tokenizer import build_tokenizer, read_tiktoken_ranks
from .weights import convert_tensors, convert_weights, expected_shapes, source_shards

__all__ = ["CACHE_ENV", "MARKER", "build_tokenizer", "cache_root", "convert_model", "convert_tensors",
           "convert_weights", "expected_shapes", "generation", "glm_config", "is_original_chatglm", "read_config",
           "read_tiktoken_ranks", "resolve_model_path", "rope_scaling", "source_shards"]
