"""Whether a prefix can reach a model's attention, decided by what the model does rather than by its name.

A P-Tuning v2 prefix enters every layer as ``past_key_values``: the attention asks its cache for the keys and values
before the current tokens and attends to them. So the question "can this model take a prefix, and of what shape?"
is answered by running it once: ``probe`` builds the model from its config on the ``meta`` device (no memory, no
weights), feeds one token through a cache whose layers only record what they are given, and reads off, per layer,
the number of key/value heads and the widths of one key and of one value. Whatever the attention stores is what the
prefix must supply: for Llama-like models ``[heads, head_dim]`` keys and values; for multi-head latent attention
(DeepSeek-V2/V3, Kimi K2, GLM-4.7-Flash, MiniCPM3) the compressed latent (key width ``kv_lora_rank``) and the shared
rotary key (value width ``qk_rope_head_dim``) in one head, which the layer decompresses exactly as it does its own.

Refused, each with one line naming the model type and the reason (``UserError``), before any weight is loaded:
encoder-decoder models; layers that keep a recurrent or convolution state instead of keys and values (linear
attention, Mamba/SSM hybrids); sparse attention whose cache also keeps indexer keys; layers that reuse another layer's
cache; models whose attention never writes to ``past_key_values``; and layers of different key/value shapes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from .errors import UserError

# Cache layer types (transformers.cache_utils.DYNAMIC_LAYER_TYPE_MAPPING) that hold per-token keys and values.
KV_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
NO_KV_REASONS = {
    "linear_attention": "keep a recurrent state (linear attention / state space) instead of per-token keys and values",
    "conv": "keep a convolution state instead of per-token keys and values",
    "hybrid": "run a state-space mixer beside their attention and keep its recurrent state",
    "hybrid_sliding": "run a state-space mixer beside their attention and keep its recurrent state",
    "indexed_attention": "use sparse attention whose cache also keeps indexer keys for the prefix to supply",
    "heavily_compressed_attention": "use compressed sparse attention with a cache layout of its own",
    "compressed_sparse_attention": "use compressed sparse attention with a cache layout of its own",
    "dummy": "reuse another layer's keys and values (shared key/value layers) or have no attention",
}


@dataclass(frozen=True)
class LayerShape:
    """What one attention layer's cache receives per token: ``kv_heads`` heads of ``key_dim``-wide keys and
    ``value_dim``-wide values."""

    kv_heads: int
    key_dim: int
    value_dim: int


@dataclass(frozen=True)
class Capability:
    """The outcome of a probe: the model type, its class name and every layer's cache shape (all equal)."""

    model_type: str
    architecture: str
    layers: tuple[LayerShape, ...]

    @property
    def shape(self) -> LayerShape:
        return self.layers[0]


class _RecordingLayer(DynamicLayer):
    """A cache layer that notes the shapes it is given and hands the states straight back."""

    def __init__(self, log: dict, index: int):
        super().__init__()
        self.log, self.index = log, index

    def update(self, key_states, value_states, *args, **kwargs):
        self.log.setdefault(self.index, []).append((tuple(key_states.shape), tuple(value_states.shape)))
        return key_states, value_states


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _name(config) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    return archs[0] if archs else type(config).__name__.replace("Config", "")


def config_refusal(config) -> str | None:
    """Why the config alone shows that a prefix cannot work, or None."""
    model_type = getattr(config, "model_type", "?")
    text = _text_config(config)
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        return (f"model_type {model_type!r} is not supported: it is an encoder-decoder model, and this prefix is for "
                "decoder-only causal LMs")
    try:
        layer_types, _ = get_layer_types_and_kwargs(text)
    except (AttributeError, TypeError, KeyError, ValueError):
        return None  # the probe decides
    for kind, reason in NO_KV_REASONS.items():
        where = [i for i, t in enumerate(layer_types) if t == kind]
        if where:
            shown = ", ".join(map(str, where[:4])) + (", ..." if len(where) > 4 else "")
            return (f"model_type {model_type!r} is not supported: layers {shown} ({kind}) {reason}, which a "
                    "prefix cannot reach")
    return None


def _meta_copy(config, model_class=None, dtype=None):
    """The model built from ``config`` on the meta device, with implementations that need no real data (eager
    attention, data-independent batched experts)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    kwargs = dict(attn_implementation="eager", experts_implementation="batched_mm")
    if dtype is not None:
        kwargs["dtype"] = dtype
    # Under ZeRO-3 transformers would build it inside deepspeed.zero.Init (partitioned across ranks); the meta copy
    # is this process's alone, so it says that Init has already been entered.
    from transformers import modeling_utils

    skip_zero_init = getattr(modeling_utils, "set_zero3_state", contextlib.nullcontext)
    with torch.device("meta"), skip_zero_init():
        if model_class is not None:
            try:
                return model_class._from_config(config, **kwargs)
            except (TypeError, ValueError):
                return model_class._from_config(config, attn_implementation="eager")
        try:
            return AutoModelForCausalLM.from_config(config, **kwargs)
        except (TypeError, ValueError):
            return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _record(model, device) -> dict:
    """Per-layer (key shape, value shape) lists from a one-token forward through a recording cache."""
    log: dict = {}
    layers = getattr(_text_config(model.config), "num_hidden_layers", None) or 256
    cache = Cache(layers=[_RecordingLayer(log, i) for i in range(layers)])
    ids = torch.ones(1, 1, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    except (RuntimeError, NotImplementedError):
        if device != "meta":
            raise
        log.clear()  # some models look at the ids for padding unless given a mask (no data on meta); others the mask
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True)
    return log


def _from_log(config, log: dict) -> Capability:
    model_type = getattr(config, "model_type", "?")
    if not log:
        raise UserError(f"model_type {model_type!r} is not supported: its attention never writes to past_key_values, "
                        "so a prefix cannot reach it")
    layers = getattr(_text_config(config), "num_hidden_layers", None) or len(log)
    missing = [i for i in range(layers) if i not in log]
    if missing:
        raise UserError(f"model_type {model_type!r} is not supported: layers {missing[:4]} keep no key/value cache "
                        "(cross-attention or no attention), so a prefix cannot reach them")
    twice = [i for i, calls in log.items() if len(calls) != 1]
    if twice:
        raise UserError(f"model_type {model_type!r} is not supported: layer {twice[0]} writes to its cache "
                        f"{len(log[twice[0]])} times per token")
    shapes = []
    for i in range(layers):
        (k, v), = log[i]
        if len(k) != 4 or len(v) != 4 or k[1] != v[1] or k[2] != 1 or v[2] != 1:
            raise UserError(f"model_type {model_type!r} is not supported: layer {i} caches keys {list(k)} and values "
                            f"{list(v)} for one token, not [batch, heads, 1, width]")
        shapes.append(LayerShape(k[1], k[3], v[3]))
    if len(set(shapes)) > 1:
        kinds = sorted(set(shapes), key=shapes.index)
        shown = "; ".join(f"{s.kv_heads} heads x key {s.key_dim} / value {s.value_dim} (layer {shapes.index(s)})"
                          for s in kinds[:3])
        raise UserError(f"model_type {model_type!r} is not supported yet: its layers cache keys/values of different "
                        f"shapes ({shown}), and the prefix has one shape for every layer")
    return Capability(model_type, _name(config), tuple(shapes))


@functools.lru_cache(maxsize=32)
def _probe_cached(config_json: str, config_class, model_class) -> Capability:
    config = config_class.from_dict(json.loads(config_json))
    return _probe(config, model_class)


# Config fields that change between the config read before loading and the loaded model's, but not its attention
_VOLATILE = ("quantization_config", "dtype", "torch_dtype", "_name_or_path", "transformers_version",
             "_attn_implementation_autoset", "attn_implementation", "experts_implementation")


def _cache_key(config) -> str:
    raw = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE}
    return json.dumps(raw, sort_keys=True, default=str)


def _probe(config, model_class=None) -> Capability:
    try:
        model = _meta_copy(config, model_class)
    except Exception as e:  # a config transformers itself cannot build a model from
        if getattr(config, "auto_map", None) and model_class is None:
            raise _MetaUnsupported(str(e)) from None  # remote code: decided on the loaded model's own class
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise UserError(f"model_type {getattr(config, 'model_type', '?')!r}: cannot build the model from its config "
                        f"({first})") from None
    try:
        log = _record(model, "meta")
    except UserError:
        raise
    except Exception as e:
        message = str(e)
        if "conv state" in message or "linear attention" in message or "own and is not compatible" in message:
            raise UserError(f"model_type {getattr(config, 'model_type', '?')!r} is not supported: its layers keep a "
                            "recurrent or convolution state that a prefix cannot reach") from None
        if "indexer" in message or "compression" in message:
            raise UserError(f"model_type {getattr(config, 'model_type', '?')!r} is not supported: its sparse attention "
                            "keeps a cache layout of its own") from None
        raise _MetaUnsupported(message) from None
    return _from_log(config, log)


class _MetaUnsupported(Exception):
    """The one-token forward needs real data (e.g. a ``.item()``); probe the loaded model instead."""


def probe(config, model=None) -> Capability:
    """The cache shape a prefix must have for the model of ``config`` (or the loaded ``model``), or ``UserError``.

    The meta-device forward takes a second or two for 27B-671B configs on a CPU (``bench/probe.py``) and is cached
    per config. When
    a model's forward needs real data (a few old architectures call ``.item()``), the loaded ``model`` itself runs
    the one token; without it the answer waits until the weights are loaded (``None``).
    """
    reason = config_refusal(config)
    if reason:
        raise UserError(reason)
    model_class = type(model) if model is not None else None
    if model_class is not None and model_class.__name__ in (getattr(config, "architectures", None) or ()):
        model_class = None  # what AutoModelForCausalLM builds from this config: share the probe made before loading
    try:
        try:
            return _probe_cached(_cache_key(config), type(config), model_class)
        except (TypeError, ValueError, AttributeError):  # configs that do not round-trip through JSON
            return _probe(config, model_class)
    except _MetaUnsupported:
        if model is None:
            return None
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        log = _record(model, device)
    except Exception as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise UserError(f"model_type {getattr(config, 'model_type', '?')!r} is not supported: one token through it "
                        f"with a transformers Cache as past_key_values failed ({first})") from None
    finally:
        model.train(was_training)
    return _from_log(config, log)


def check_model(config, model=None) -> str:
    """The architecture name when a prefix can reach every layer of this model; else ``UserError`` in one line."""
    probe(config, model)
    return _name(config)
