"""ptuning: P-Tuning v2 (deep prompt tuning) for Hugging Face causal LMs."""

from __future__ import annotations

from .errors import UserError

__all__ = ["MultiPrefixModel", "PrefixConfig", "PrefixEncoder", "PrefixTunedModel", "UserError", "attach_prefix",
           "chat", "load", "load_base_model", "load_from_args", "load_multi", "load_prefix", "save_prefix", "stream_chat"]

_LAZY = {"PrefixConfig": "prefix", "PrefixEncoder": "prefix", "PrefixTunedModel": "model", "attach_prefix": "model",
         "load_base_model": "model", "load_prefix": "export", "save_prefix": "export",
         "MultiPrefixModel": "serving", "load_multi": "serving", "chat": "chat", "stream_chat": "chat"}


def __getattr__(name):
    """Import torch/transformers only when a model is needed, so `import ptuning.data` stays fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


def load(base: str, prefix: str | None = None, *, torch_dtype: str = "auto", trust_remote_code: bool = False,
         quantization_bit: int | None = None, quant_type: str = "nf4", double_quant: bool = False,
         for_training: bool = False, **new_prefix):
    """(model, tokenizer): the frozen base from a directory or hub id, with a saved prefix or a fresh one."""
    from .export import load_prefix
    from .model import attach_prefix, load_base_model

    model, tokenizer = load_base_model(base, torch_dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                       quantization_bit=quantization_bit, quant_type=quant_type,
                                       double_quant=double_quant)
    if prefix:
        return load_prefix(model, prefix, for_training=for_training), tokenizer
    return attach_prefix(model, **new_prefix), tokenizer


def load_from_args(model_args, prefix_args=None, for_training: bool = False):
    """``load`` with the command line's ``ModelArguments`` (and ``PrefixArguments`` for a fresh prefix)."""
    return load(model_args.model_name_or_path, model_args.ptuning_checkpoint, torch_dtype=model_args.torch_dtype,
                trust_remote_code=model_args.trust_remote_code, quantization_bit=model_args.quantization_bit,
                quant_type=model_args.quant_type, double_quant=model_args.double_quant, for_training=for_training,
                **(vars(prefix_args) if prefix_args is not None else {}))
