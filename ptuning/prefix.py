"""P-Tuning v2 deep prompts: the prefix encoder, its self-describing config, and the caches that feed it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .errors import UserError

CONFIG_NAME = "prefix_config.json"
# 1: keys and values of one width (head_dim). 2: adds value_head_dim, which differs from head_dim for multi-head
# latent attention; a version-1 file loads with value_head_dim = head_dim.
FORMAT_VERSION = 2


@dataclass
class PrefixConfig:
    """Everything needed to rebuild and validate a prefix, stored next to its weights so nobody retypes it."""

    pre_seq_len: int
    num_layers: int
    num_kv_heads: int
    head_dim: int  # width of one key head as the attention caches it
    hidden_size: int
    prefix_projection: bool = False
    prefix_hidden_size: int = 512
    prefix_dropout: float = 0.0
    # Token positions start at pre_seq_len (PEFT / HF cache convention) when True, at 0 (ChatGLM) when False.
    position_offset: bool = True
    base_model_name_or_path: str = ""
    base_architecture: str = ""
    vocab_size: int = 0
    dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    # What the prefix was trained for: causal_lm (generation) or an encoder task (seq_cls, token_cls, qa; see
    # ptuning.nlu), and that task's label list in head order (empty for causal_lm and qa). Checkpoints written
    # before these fields existed load as causal_lm.
    task_type: str = "causal_lm"
    labels: list = field(default_factory=list)
    # Width of one value head as the attention caches it; None (version-1 files) means head_dim.
    value_head_dim: int | None = None

    def __post_init__(self):
        if self.value_head_dim is None:
            self.value_head_dim = self.head_dim

    @property
    def key_dim(self) -> int:
        """Keys of one layer for one token: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        """Values of one layer for one token: ``num_kv_heads * value_head_dim``."""
        return self.num_kv_heads * self.value_head_dim

    @property
    def kv_dim(self) -> int:
        """The key width of one layer (equal to the value width except under multi-head latent attention)."""
        return self.key_dim

    @property
    def same_widths(self) -> bool:
        return self.head_dim == self.value_head_dim

    @property
    def prefix_width(self) -> int:
        """Width of one prefix row: keys and values of every layer."""
        return self.num_layers * (self.key_dim + self.value_dim)

    def to_json(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**dataclasses.asdict(self), "format_version": FORMAT_VERSION}, f, indent=2, ensure_ascii=False)
            f.write("\n")

    @classmethod
    def from_json(cls, path) -> "PrefixConfig":
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise UserError(f"{path}: missing; a prefix checkpoint directory must contain {CONFIG_NAME}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UserError(f"{path}: unknown keys {unknown}; was it written by a newer ptuning?")
        try:
            return cls(**raw)
        except TypeError as e:
            raise UserError(f"{path}: {e}") from None


def model_geometry(config_or_model) -> dict:
    """Layers, kv heads, key and value head widths, hidden size and vocab of a model.

    A transformers config or model is asked what its attention caches (``ptuning.capability.probe``: one token on
    the meta device), which refuses models a prefix cannot reach; anything else (a plain namespace of ChatGLM's
    config.json fields) is read by attribute names.
    """
    from transformers import PreTrainedConfig

    model = None if isinstance(config_or_model, PreTrainedConfig) or not hasattr(config_or_model, "config") \
        else config_or_model
    config = model.config if model is not None else config_or_model
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or getattr(text, "d_model", None)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    if isinstance(config, PreTrainedConfig):
        from .capability import probe

        found = probe(config, model)
        if found is not None:
            shape = found.shape
            if hidden is None and model is not None:
                hidden = model.get_input_embeddings().weight.shape[1]
            return dict(num_layers=len(found.layers), num_kv_heads=shape.kv_heads, head_dim=shape.key_dim,
                        value_head_dim=shape.value_dim, hidden_size=int(hidden), vocab_size=vocab)
    num_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    num_heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    num_kv_heads = getattr(text, "num_key_value_heads", None) or getattr(text, "multi_query_group_num", None)
    num_kv_heads = num_kv_heads or num_heads
    head_dim = getattr(text, "head_dim", None) or (hidden // num_heads)
    return dict(
        num_layers=int(num_layers),
        num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim),
        value_head_dim=int(head_dim),
        hidden_size=int(hidden),
        vocab_size=vocab,
    )


class PrefixEncoder(nn.Module):
    """Trainable per-layer keys/values, optionally reparameterised by the Prefix-Tuning MLP.

    Weights: ``embedding`` is ``[pre_seq_len, num_layers * 2 * kv_dim]`` without projection, or
    ``[pre_seq_len, hidden_size]`` followed by ``trans`` = Linear(hidden_size, prefix_hidden_size) → Tanh →
    Linear(prefix_hidden_size, prefix_width) with it (ChatGLM's names).
    ``forward()`` returns the flat prefix ``[pre_seq_len, prefix_width]``, ``prefix_width = num_layers * (key_dim +
    value_dim)``; along its last dim, layer ``i`` holds its keys (``key_dim = num_kv_heads * head_dim``) and then its
    values (``value_dim = num_kv_heads * value_head_dim``). When the two widths are equal this is the ChatGLM/PEFT
    layout ``[pre_seq_len, num_layers * 2 * kv_dim]``.
    """

    def __init__(self, config: PrefixConfig):
        super().__init__()
        self.config = config
        if config.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.prefix_hidden_size),
                nn.Tanh(),
                nn.Linear(config.prefix_hidden_size, config.prefix_width),
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, config.prefix_width)
        self.dropout = nn.Dropout(config.prefix_dropout)

    def forward(self) -> torch.Tensor:
        """The MLP runs once per step for the whole batch, not once per row."""
        prefix = self.embedding.weight
        if self.config.prefix_projection:
            prefix = self.trans(prefix)
        return prefix

    def key_values(self, batch_size: int, dtype: torch.dtype, repeats: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys ``[batch_size * repeats, num_kv_heads, pre_seq_len, head_dim]``, values
        ``[..., value_head_dim]``)."""
        return split_key_values(self(), self.config, batch_size * repeats, dtype, self.dropout)


def split_key_values(flat: torch.Tensor, config: PrefixConfig, batch_size: int, dtype, dropout=None):
    """Turn a flat ``[pre_seq_len, width]`` (or per-row ``[batch, pre_seq_len, width]``) prefix into layer K/V pairs."""
    if flat.dim() == 2:
        flat = flat.unsqueeze(0).expand(batch_size, -1, -1)
    if dropout is not None and dropout.p > 0 and dropout.training:
        flat = dropout(flat)
    flat = flat.to(dtype)
    c = config
    p = flat.shape[1]
    if c.same_widths:
        kv = flat.view(batch_size, p, 2 * c.num_layers, c.num_kv_heads, c.head_dim).permute(2, 0, 3, 1, 4)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(c.num_layers)]
    per_layer = flat.view(batch_size, p, c.num_layers, c.key_dim + c.value_dim)
    keys = per_layer[..., : c.key_dim].reshape(batch_size, p, c.num_layers, c.num_kv_heads, c.head_dim)
    values = per_layer[..., c.key_dim :].reshape(batch_size, p, c.num_layers, c.num_kv_heads, c.value_head_dim)
    keys, values = keys.permute(2, 0, 3, 1, 4), values.permute(2, 0, 3, 1, 4)
    return [(keys[i], values[i]) for i in range(c.num_layers)]


class ReadOnlyPrefixLayer(DynamicLayer):
    """A cache layer that serves the prefix without storing anything.

    Training never needs a growing cache, and a cache that does not grow lets a layer be recomputed under
    gradient checkpointing with exactly the keys/values it saw the first time.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def read_only_cache(key_values) -> Cache:
    return Cache(layers=[ReadOnlyPrefixLayer(k, v) for k, v in key_values])


def generation_cache(key_values, model_config) -> DynamicCache:
    """A normal growing cache seeded with the prefix, as ``generate()`` expects."""
    cache = DynamicCache(config=model_config)
    for i, (k, v) in enumerate(key_values):
        cache.update(k.contiguous(), v.contiguous(), i)
    return cache
