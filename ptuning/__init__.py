"""ptuning: P-Tuning v2 (deep prompt tuning) for Hugging Face causal LMs."""

from __future__ import annotations

from .errors import UserError
from .export import load_prefix, save_prefix
from .model import PrefixTunedModel, attach_prefix, load_base_model
from .prefix import PrefixConfig, PrefixEncoder

__all__ = ["PrefixConfig", "PrefixEncoder", "PrefixTunedModel", "UserError", "attach_prefix", "load",
           "load_base_model", "load_prefix", "save_prefix"]


def load(base: str, prefix: str | None = None, *, torch_dtype: str = "auto", trust_remote_code: bool = False,
         quantization_bit: int | None = None, quant_type: str = "nf4", double_quant: bool = False,
         for_training: bool = False, **new_prefix):
    """(model, tokenizer): the frozen base from a directory or hub id, with a saved prefix or a fresh one."""
    model, tokenizer = load_base_model(base, torch_dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                       quantization_bit=quantization_bit, quant_type=quant_type,
                                       double_quant=double_quant)
    if prefix:
        return load_prefix(model, prefix, for_training=for_training), tokenizer
    return attach_prefix(model, **new_prefix), tokenizer
