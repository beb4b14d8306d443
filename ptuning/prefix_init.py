"""Start a prefix from the keys/values of real text, so training begins at the prompted model instead of noise.

A freshly initialised random prefix is attended to by every layer and derails the base model before the first step
(on SmolLM2-135M, 60 steps at lr 5e-5 end with 0 % of replies in the trained format and 0 % of facts right).
Running the base once on an instruction text and copying its per-layer cache into the prefix gives, at step 0,
exactly the base model with that text prepended: with ``position_offset`` the real tokens start at position
``pre_seq_len``, right after the text's positions ``0 .. pre_seq_len - 1``, as if the text were part of the input.
"""

from __future__ import annotations

import logging

import torch

from .errors import UserError

logger = logging.getLogger(__name__)


def init_text_ids(tokenizer, text: str, pre_seq_len: int) -> list[int]:
    """The text's token ids (no special tokens added), truncated, or repeated end to end, to ``pre_seq_len``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("--prefix_init_text: the text has no tokens")
    if len(ids) != pre_seq_len:
        logger.info("--prefix_init_text has %d tokens; %s to --pre_seq_len %d", len(ids),
                    "truncated" if len(ids) > pre_seq_len else "repeated", pre_seq_len)
    return (ids * (pre_seq_len // len(ids) + 1))[:pre_seq_len]


@torch.no_grad()
def text_key_values(base, input_ids: torch.Tensor) -> torch.Tensor:
    """The flat prefix ``[pre_seq_len, num_layers * 2 * kv_dim]`` (PrefixEncoder layout: per layer keys, then values)
    holding the base model's cache after reading ``input_ids`` ``[pre_seq_len]`` from position 0."""
    cache = base(input_ids=input_ids.unsqueeze(0), use_cache=True).past_key_values
    blocks = []
    for layer in cache.layers:  # keys/values [1, num_kv_heads, pre_seq_len, head_dim], keys already rotated
        for t in (layer.keys, layer.values):
            blocks.append(t[0].permute(1, 0, 2).reshape(t.shape[2], -1))  # [pre_seq_len, kv_dim]
    return torch.cat(blocks, dim=-1)


AUTO = "auto"


def example_ids(rows_input_ids, pre_seq_len: int) -> list[int]:
    """``--prefix_init_text auto``: the first training examples' tokens, back to back, cut to ``pre_seq_len``, so the
    prefix starts as the base model that has just read a few worked examples of the task."""
    ids: list[int] = []
    for row in rows_input_ids:
        ids += list(row)
        if len(ids) >= pre_seq_len:
            break
    if not ids:
        raise UserError("--prefix_init_text auto: the training set is empty")
    return (ids * (pre_seq_len // len(ids) + 1))[:pre_seq_len]


def init_prefix_from_text(model, tokenizer, text: str, examples=None) -> list[int]:
    """Overwrite ``model``'s prefix with the K/V of ``text`` (or, for ``"auto"``, of the token id lists
    ``examples``); returns the token ids used. Needs the plain prefix (no ``--prefix_projection``: an MLP's output
    cannot be set to chosen values by copying)."""
    config = model.prefix_config
    if config.prefix_projection:
        raise UserError("--prefix_init_text: not available with --prefix_projection (the MLP's output cannot be set "
                        "to the text's keys/values); drop one of the two")
    if not config.position_offset:
        logger.warning("--prefix_init_text with --position_offset false: the text's keys were computed at positions "
                       "0..%d, which the input's first tokens reuse, so step 0 only approximates the prompted model",
                       config.pre_seq_len - 1)
    if text == AUTO:
        ids = example_ids(examples or [], config.pre_seq_len)
    else:
        ids = init_text_ids(tokenizer, text, config.pre_seq_len)
    embedding = model.prefix_encoder.embedding.weight
    was_training = model.base.training
    model.base.eval()
    flat = text_key_values(model.base, torch.tensor(ids, device=embedding.device))
    model.base.train(was_training)
    if flat.shape != embedding.shape:
        raise UserError(f"--prefix_init_text: the model's cache is {tuple(flat.shape)} per text, the prefix "
                        f"{tuple(embedding.shape)}; this architecture's cache layout is not supported")
    with torch.no_grad():
        embedding.copy_(flat.to(embedding.dtype))
    return ids
