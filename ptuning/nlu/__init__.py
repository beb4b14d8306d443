"""P-Tuning v2 for understanding tasks: a frozen encoder + trainable prefix + trainable task head.

``--task_type seq_cls | token_cls | qa`` loads ``AutoModelFor{SequenceClassification, TokenClassification,
QuestionAnswering}``, freezes the backbone, keeps the head (``classifier`` / ``qa_outputs``) trainable and feeds the
same ``PrefixEncoder`` keys/values (``ptuning.prefix``) to every self-attention layer as a read-only
``past_key_values`` cache, with the attention mask extended by ``pre_seq_len`` ones. That is exactly how PEFT's
``PrefixTuningConfig(task_type="SEQ_CLS")`` drives these models, and the tests check logits against it.

Supported encoder families, and why:

- **BERT** and **RoBERTa** (and **XLM-RoBERTa**, which runs RoBERTa's code): their self-attention in transformers 5
  still calls ``past_key_values.update(k, v, layer_idx)`` even in encoder mode, and ``BertModel`` builds the
  bidirectional mask from a 2-D mask whose length may exceed the input (the "prefix tuning" case in
  ``masking_utils``), so a prefix needs no patching at all.
- **ELECTRA** is the third family: it has the same cache path, so it works without an attention hook, and it is a
  genuinely different model (discriminator pre-training, ``embedding_size`` ≠ ``hidden_size`` with a projection, a
  two-layer classification head) that is widely used for NLU, Chinese included (HFL's chinese-electra).
  DeBERTa-v2 — used by the P-tuning v2 paper for SuperGLUE — was not chosen: its disentangled attention has no cache
  path in transformers 5 (``modeling_deberta_v2`` never reads ``past_key_values``), so it would need a patched
  attention forward that also decides how relative positions treat prefix keys; that is a model-specific fork of
  transformers code rather than a "small hook", and it could not be checked against PEFT, which does not support it
  either.

Because the embeddings number tokens after the cache, positions start at ``pre_seq_len`` (as in PEFT and the
original P-tuning v2 code): ``pre_seq_len + max_source_length`` must fit the model's position embeddings.

Checkpoints are ``ptuning.export``'s: ``prefix_config.json`` (with ``task_type`` and ``labels``),
``prefix_model.safetensors`` (+ ``prefix_encoder.safetensors`` with ``--prefix_projection``), plus
``task_head.safetensors`` holding the head's tensors under the base model's own names.

Modules: ``model`` (wrapper, load/save/restore), ``data`` (columns, validation, tokenisation), ``qa`` (windows and
answer post-processing), ``metrics`` (accuracy/macro-F1, entity F1, SQuAD EM/F1), ``run`` (Trainer-based CLI flow).
"""

from __future__ import annotations

import json
import os

__all__ = ["PrefixTunedEncoder", "attach_prefix", "load", "restore", "save_nlu"]


def is_nlu_run(model_args) -> bool:
    """True for ``--task_type seq_cls|token_cls|qa``, or for a ``--ptuning_checkpoint`` trained for one of them (so
    predicting from an NLU checkpoint needs no ``--task_type``). Reads only JSON: no torch import."""
    if model_args.task_type != "causal_lm":
        return True
    path = os.path.join(model_args.ptuning_checkpoint or "", "prefix_config.json")
    if not model_args.ptuning_checkpoint or not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            task_type = json.load(f).get("task_type", "causal_lm")
    except (OSError, ValueError, AttributeError):
        return False  # the causal loader reports a broken checkpoint
    if task_type != "causal_lm":
        model_args.task_type = task_type
        return True
    return False


def __getattr__(name):
    """Import torch/transformers only when a model is needed."""
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(name)
