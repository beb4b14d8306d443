"""Several prefixes on one frozen base: each row of a batch picks its own prefix, for forward() and generate().

Prefixes may have different ``pre_seq_len``. Each row's prefix is right-aligned in a ``max_pre_seq_len`` block and
the unused slots in front of it are masked (attention mask 0, zero keys/values), so the real prefix stays adjacent
to the tokens. Token positions are computed per row from its own mask and offset by that row's ``pre_seq_len`` when
its prefix has ``position_offset`` (the PEFT/HF convention; ChatGLM prefixes are not offset). A row therefore gets
the logits and greedy tokens it gets alone with its own ``PrefixTunedModel``.

    model, tokenizer = load_multi("BASE", {"support": "out/support", "legal": "out/legal"})
    out = model.generate(input_ids, attention_mask, prefix_ids=["support", "legal"], max_new_tokens=64)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .errors import UserError
from .export import load_prefix
from .model import PrefixTunedModel, _activation_dtype, check_architecture
from .prefix import PrefixConfig, generation_cache, model_geometry, read_only_cache, split_key_values


class MultiPrefixModel(nn.Module):
    """A frozen causal LM serving named prefixes; ``prefix_ids`` (names or indices into ``names``) picks one per row."""

    def __init__(self, base: nn.Module, prefixes: Mapping[str, "str | PrefixTunedModel"] | None = None):
        super().__init__()
        check_architecture(base.config, base)
        base.requires_grad_(False)
        self.base = base
        self._prefixes: dict[str, tuple[PrefixConfig, torch.Tensor]] = {}
        for name, source in (prefixes or {}).items():
            self.add_prefix(name, source)

    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return self.base.get_input_embeddings().weight.device

    @property
    def generation_config(self):
        return self.base.generation_config

    @property
    def names(self) -> list[str]:
        return list(self._prefixes)

    def prefix_config(self, name: str) -> PrefixConfig:
        return self._prefixes[name][0]

    @torch.no_grad()
    def add_prefix(self, name: str, source: "str | PrefixTunedModel") -> None:
        """Add a prefix from a checkpoint directory or an in-memory ``PrefixTunedModel`` (its current weights)."""
        if name in self._prefixes:
            raise UserError(f"prefix {name!r} is already loaded")
        if isinstance(source, PrefixTunedModel):
            config, flat = source.prefix_config, source.prefix_encoder()
            geometry = model_geometry(self.base)
            for key in ("num_layers", "num_kv_heads", "head_dim", "value_head_dim"):
                if getattr(config, key) != geometry[key]:
                    raise UserError(f"prefix {name!r}: {key} is {getattr(config, key)} but the base model has "
                                    f"{geometry[key]}")
        else:
            loaded = load_prefix(self.base, str(source))
            config, flat = loaded.prefix_config, loaded.prefix_encoder.embedding.weight
        flat = flat.detach().to(self.device, torch.float32).clone()
        self._prefixes[name] = (config, flat)

    def remove_prefix(self, name: str) -> None:
        self._prefixes.pop(name)

    def prefix_weights(self, name: str) -> torch.Tensor:
        """The flat fp32 prefix ``[pre_seq_len, num_layers * 2 * kv_dim]`` of a loaded prefix (for schedulers)."""
        return self._prefixes[name][1]

    def _row_names(self, prefix_ids, batch_size: int) -> list[str]:
        if prefix_ids is None:
            raise UserError(f"prefix_ids is required: one of {self.names} per row")
        if isinstance(prefix_ids, (str, int)):
            prefix_ids = [prefix_ids] * batch_size
        elif torch.is_tensor(prefix_ids):
            prefix_ids = prefix_ids.tolist()
        if not isinstance(prefix_ids, Sequence) or len(prefix_ids) != batch_size:
            raise UserError(f"prefix_ids: expected one prefix per row ({batch_size}), got {prefix_ids!r}")
        names = []
        for pid in prefix_ids:
            name = self.names[pid] if isinstance(pid, int) and 0 <= pid < len(self.names) else pid
            if name not in self._prefixes:
                raise UserError(f"prefix_ids: unknown prefix {pid!r}; loaded: {self.names}")
            names.append(name)
        return names

    def _prefixed_inputs(self, input_ids, attention_mask, names: list[str], repeats: int = 1):
        """Per-row keys/values padded at the front to the longest prefix, the matching mask, and per-row positions."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch_size = input_ids.shape[0]
        configs = [self._prefixes[n][0] for n in names]
        longest = max(c.pre_seq_len for c in configs)
        width = configs[0].prefix_width
        flat = torch.zeros(batch_size, longest, width, device=self.device)
        prefix_mask = attention_mask.new_zeros(batch_size, longest)
        offsets = torch.zeros(batch_size, 1, dtype=torch.long, device=attention_mask.device)
        for row, (name, config) in enumerate(zip(names, configs)):
            p = config.pre_seq_len
            flat[row, longest - p :] = self._prefixes[name][1]
            prefix_mask[row, longest - p :] = 1
            offsets[row] = p if config.position_offset else 0
        full_mask = torch.cat([prefix_mask, attention_mask], dim=1)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + offsets
        if repeats > 1:
            flat = flat.repeat_interleave(repeats, dim=0)
        key_values = split_key_values(flat, configs[0], flat.shape[0], _activation_dtype(self.base))
        return key_values, full_mask, position_ids

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, prefix_ids=None, **kwargs):
        names = self._row_names(prefix_ids, input_ids.shape[0])
        key_values, full_mask, position_ids = self._prefixed_inputs(input_ids, attention_mask, names)
        out = self.base(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids,
                        past_key_values=read_only_cache(key_values), use_cache=False, **kwargs)
        return CausalLMOutputWithPast(logits=out.logits)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, prefix_ids=None, **kwargs):
        names = self._row_names(prefix_ids, input_ids.shape[0])
        gen_cfg = kwargs.get("generation_config") or self.base.generation_config
        beams = kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1)) or 1
        returns = kwargs.get("num_return_sequences", getattr(gen_cfg, "num_return_sequences", 1)) or 1
        key_values, full_mask, position_ids = self._prefixed_inputs(input_ids, attention_mask, names,
                                                                    repeats=max(beams, returns))
        return self.base.generate(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=position_ids,
            past_key_values=generation_cache(key_values, self.base.config),
            **kwargs,
        )


def load_multi(base: str, prefixes: Mapping[str, str], *, torch_dtype: str = "auto",
               trust_remote_code: bool = False, quantization_bit: int | None = None, quant_type: str = "nf4",
               double_quant: bool = False):
    """(MultiPrefixModel, tokenizer): the base loaded once, with every ``name → checkpoint dir`` prefix on it."""
    from .model import load_base_model

    model, tokenizer = load_base_model(base, torch_dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                       quantization_bit=quantization_bit, quant_type=quant_type,
                                       double_quant=double_quant)
    return MultiPrefixModel(model, prefixes), tokenizer
