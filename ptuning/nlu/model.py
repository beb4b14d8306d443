"""A frozen encoder with a task head, fed the P-Tuning v2 prefix at every layer; loading, saving, restoring."""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, AutoTokenizer)
from transformers.utils import logging as hf_logging

from ..errors import UserError
from ..export import (PREFIX_KEY, PREFIX_WEIGHTS, _load_tensors, check_fits_base, load_encoder_weights,
                      read_prefix_config, save_prefix)
from ..model import DTYPES, PrefixModelBase, new_prefix_config
from ..prefix import PrefixConfig, read_only_cache
from .data import TASK_TYPES

logger = logging.getLogger(__name__)

HEAD_WEIGHTS = "task_head.safetensors"
AUTO_CLASSES = {
    "seq_cls": AutoModelForSequenceClassification,
    "token_cls": AutoModelForTokenClassification,
    "qa": AutoModelForQuestionAnswering,
}
# model_type → extra positions its embeddings reserve below the first token (RoBERTa counts from padding_idx + 1).
SUPPORTED_ENCODERS = {"bert": False, "electra": False, "roberta": True, "xlm-roberta": True}


def check_task_type(task_type: str) -> str:
    if task_type not in TASK_TYPES:
        raise UserError(f"--task_type: expected causal_lm, {', '.join(TASK_TYPES)}; got {task_type!r}")
    return task_type


def check_encoder(config) -> str:
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_ENCODERS:
        raise UserError(f"model_type {model_type!r} is not supported for understanding tasks; supported: "
                        f"{', '.join(SUPPORTED_ENCODERS)}")
    if getattr(config, "is_decoder", False):
        raise UserError(f"{model_type} is configured as a decoder (is_decoder=True); understanding tasks need the "
                        "bidirectional encoder")
    return model_type


def position_budget(config, pre_seq_len: int) -> int:
    """How many tokens fit after the prefix: the embeddings number tokens from ``pre_seq_len`` on."""
    reserved = config.pad_token_id + 1 if SUPPORTED_ENCODERS[config.model_type] else 0
    return config.max_position_embeddings - reserved - pre_seq_len


def check_length(config, pre_seq_len: int, max_length: int) -> None:
    budget = position_budget(config, pre_seq_len)
    if max_length > budget:
        raise UserError(
            f"--max_source_length {max_length} with --pre_seq_len {pre_seq_len} needs more than the "
            f"{config.max_position_embeddings} position embeddings of this {config.model_type}: its token positions "
            f"start after the prefix (as in PEFT and P-tuning v2); use --max_source_length {max(budget, 0)} or less"
        )


class PrefixTunedEncoder(PrefixModelBase):
    """``AutoModelFor{SequenceClassification,TokenClassification,QuestionAnswering}`` with a frozen backbone, a
    trainable task head (everything outside the backbone: ``classifier`` / ``qa_outputs``) and ``pre_seq_len``
    trainable keys/values seen first by every self-attention layer.

    The prefix reaches the layers exactly as PEFT passes it: as ``past_key_values`` (here a read-only cache), with the
    2-D attention mask extended by ``pre_seq_len`` ones; the encoder's mask stays bidirectional, so every token
    attends to the whole prefix, and the embeddings number tokens from ``pre_seq_len`` on.
    """

    accepts_loss_kwargs = False  # the base heads average their loss; let Trainer scale for gradient accumulation

    def __init__(self, base: nn.Module, prefix_config: PrefixConfig):
        check_encoder(base.config)
        check_task_type(prefix_config.task_type)
        if not prefix_config.position_offset:
            raise UserError("--position_offset false is ChatGLM's causal-LM convention; encoders always number "
                            "tokens after the prefix")
        super().__init__(base, prefix_config)
        for name, param in base.named_parameters():
            if name in self.head_names():
                param.requires_grad_(True)

    def head_names(self) -> list[str]:
        """Names (in ``self.base``) of the task-head tensors: everything outside the backbone."""
        backbone = self.base.base_model_prefix + "."
        return [n for n, _ in self.base.named_parameters() if not n.startswith(backbone)]

    def head_state(self, state_dict: dict | None = None) -> dict:
        """Head tensors for saving, fp32 on CPU, from ``state_dict`` (keys ``base.<name>``) or the live module."""
        names = self.head_names()
        if state_dict is None:
            source = self.base.state_dict()
        else:
            source = {k[len("base."):]: v for k, v in state_dict.items() if k.startswith("base.")}
        return {n: source[n].detach().to("cpu", torch.float32).contiguous() for n in names}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, start_positions=None,
                end_positions=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = input_ids.shape[0]
        full_mask = torch.cat([attention_mask.new_ones(batch, self.prefix_config.pre_seq_len), attention_mask], dim=1)
        dtype = self.base.get_input_embeddings().weight.dtype
        kwargs = dict(input_ids=input_ids, attention_mask=full_mask,
                      past_key_values=read_only_cache(self.prefix_encoder.key_values(batch, dtype)))
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if labels is not None:
            kwargs["labels"] = labels
        if start_positions is not None:
            kwargs.update(start_positions=start_positions, end_positions=end_positions)
        return self.base(**kwargs)


def encoder_config(model_args):
    """The base model's config, checked to be a supported encoder, before any weights are read."""
    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path,
                                            trust_remote_code=model_args.trust_remote_code)
    except OSError as e:
        raise UserError(f"--model_name_or_path {model_args.model_name_or_path!r}: cannot load a model config "
                        f"({e})") from None
    check_encoder(config)
    return config


def load_encoder(name_or_path: str, task_type: str, labels: list, torch_dtype: str = "auto",
                 trust_remote_code: bool = False, quiet_head: bool = False):
    """(model, tokenizer): ``AutoModelFor<task>`` with a head sized for ``labels`` (new head weights are random)."""
    check_task_type(task_type)
    if torch_dtype not in DTYPES:
        raise UserError(f"--torch_dtype: expected one of {sorted(DTYPES)}, got {torch_dtype!r}")
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"--model_name_or_path {name_or_path!r}: cannot load a model config ({e})") from None
    model_type = check_encoder(config)
    kwargs = {}
    if task_type != "qa":
        kwargs = dict(num_labels=len(labels), id2label={i: str(v) for i, v in enumerate(labels)},
                      label2id={str(v): i for i, v in enumerate(labels)})
    tok_kwargs = {"add_prefix_space": True} if task_type == "token_cls" and SUPPORTED_ENCODERS[model_type] else {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **tok_kwargs)
    if task_type != "seq_cls" and not getattr(tokenizer, "is_fast", False):
        raise UserError(f"--task_type {task_type} needs a fast tokenizer (word ids / character offsets); "
                        f"{type(tokenizer).__name__} is not one")
    verbosity = hf_logging.get_verbosity()
    if quiet_head:  # the checkpoint supplies the head: "newly initialized ... train it" would mislead
        hf_logging.set_verbosity_error()
    try:
        model = AUTO_CLASSES[task_type].from_pretrained(name_or_path, dtype=DTYPES[torch_dtype],
                                                        trust_remote_code=trust_remote_code, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


def attach_prefix(model, task_type: str, labels: list, pre_seq_len: int, prefix_projection: bool = False,
                  prefix_hidden_size: int = 512, prefix_dropout: float = 0.0, position_offset: bool = True
                  ) -> PrefixTunedEncoder:
    """Freeze ``model`` (an encoder with a task head) and give it a fresh prefix sized from its config."""
    check_encoder(model.config)
    config = new_prefix_config(model, pre_seq_len, prefix_projection, prefix_hidden_size, prefix_dropout,
                               position_offset, base_architecture=type(model).__name__,
                               task_type=check_task_type(task_type), labels=list(labels))
    return PrefixTunedEncoder(model, config)


def save_nlu(model: PrefixTunedEncoder, out_dir: str, state_dict: dict | None = None) -> None:
    """``task_head.safetensors`` (renamed into place), then the prefix and config via ``save_prefix`` — the config
    is written last, so its presence still marks a complete checkpoint."""
    head = model.head_state(state_dict)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{HEAD_WEIGHTS}.tmp")
    save_file(head, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, HEAD_WEIGHTS))
    save_prefix(model, out_dir, state_dict=state_dict)


def read_nlu_config(ckpt_dir: str, task_type: str | None = None) -> PrefixConfig:
    config = read_prefix_config(ckpt_dir)
    if config.task_type not in TASK_TYPES:
        raise UserError(f"--ptuning_checkpoint {ckpt_dir!r} holds a {config.task_type} prefix; load it without "
                        f"--task_type (or with --task_type {config.task_type})")
    if task_type and task_type != config.task_type:
        raise UserError(f"--ptuning_checkpoint {ckpt_dir!r} was trained for --task_type {config.task_type}, "
                        f"not {task_type}")
    return config


def load_head(model: PrefixTunedEncoder, ckpt_dir: str) -> None:
    path = os.path.join(ckpt_dir, HEAD_WEIGHTS)
    saved = _load_tensors(path)
    expected = {n: p for n, p in model.base.named_parameters() if n in set(model.head_names())}
    if set(saved) != set(expected):
        raise UserError(f"{path}: holds {sorted(saved)} but this {type(model.base).__name__} head has "
                        f"{sorted(expected)}")
    for name, tensor in sorted(saved.items()):
        if tensor.shape != expected[name].shape:
            raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is "
                            f"{tuple(expected[name].shape)} (labels: {model.prefix_config.labels})")
        with torch.no_grad():
            expected[name].copy_(tensor)


def restore(base, ckpt_dir: str, for_training: bool = False) -> PrefixTunedEncoder:
    """Attach a saved prefix + head to ``base``; for inference the folded prefix replaces the projection MLP."""
    config = read_nlu_config(ckpt_dir)
    check_fits_base(config, base.config, ckpt_dir)
    if for_training:
        model = PrefixTunedEncoder(base, config)
        load_encoder_weights(model, ckpt_dir)
    else:
        model = PrefixTunedEncoder(base, dataclasses.replace(config, prefix_projection=False))
        prefix = _load_tensors(os.path.join(ckpt_dir, PREFIX_WEIGHTS)).get(PREFIX_KEY)
        if prefix is None or tuple(prefix.shape) != (config.pre_seq_len, config.prefix_width):
            raise UserError(f"{os.path.join(ckpt_dir, PREFIX_WEIGHTS)}: expected a {PREFIX_KEY!r} tensor of shape "
                            f"({config.pre_seq_len}, {config.prefix_width})")
        with torch.no_grad():
            model.prefix_encoder.embedding.weight.copy_(prefix)
    load_head(model, ckpt_dir)
    if not for_training:
        model.requires_grad_(False)
    return model


def load(base: str, prefix: str | None = None, *, task_type: str | None = None, labels: list | None = None,
         torch_dtype: str = "auto", trust_remote_code: bool = False, for_training: bool = False, **new_prefix):
    """(model, tokenizer): the encoder from a directory or hub id with a saved prefix + head, or fresh ones for
    ``task_type`` and ``labels``."""
    if prefix:
        config = read_nlu_config(prefix, task_type)
        model, tokenizer = load_encoder(base, config.task_type, config.labels, torch_dtype, trust_remote_code,
                                        quiet_head=True)
        return restore(model, prefix, for_training), tokenizer
    model, tokenizer = load_encoder(base, task_type, labels or [], torch_dtype, trust_remote_code)
    return attach_prefix(model, task_type, labels or [], **new_prefix), tokenizer
