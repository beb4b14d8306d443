"""Batched, left-padded generation with a prefix: one-shot prompts and whole prediction files."""

from __future__ import annotations

import json
import os

import torch

from .data import Collator, ColumnSpec, encode_prompt, load_rows, validate_rows


def generation_kwargs(tokenizer, max_new_tokens: int, do_sample: bool = False, **extra) -> dict:
    """Greedy by default, so the same checkpoint gives the same text on every run."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
    if not do_sample:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    kwargs.update(extra)
    return kwargs


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict]], max_source_length: int = 512,
                     max_new_tokens: int = 64, batch_size: int = 8, prefix_ids=None, **gen) -> list[str]:
    """Reply to each conversation (its last turn is the user's), ``batch_size`` prompts per generate() call.

    With a ``ptuning.serving.MultiPrefixModel``, ``prefix_ids`` names each conversation's prefix.
    """
    was_training = model.training
    model.eval()
    collate = Collator(pad_token_id=tokenizer.pad_token_id, padding_side="left")
    replies = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        batch = collate([{"input_ids": encode_prompt(tokenizer, c, max_source_length)} for c in chunk])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        if prefix_ids is not None:
            gen["prefix_ids"] = [prefix_ids] * len(chunk) if isinstance(prefix_ids, str) else \
                list(prefix_ids[start : start + batch_size])
        out = model.generate(batch["input_ids"], batch["attention_mask"],
                             **generation_kwargs(tokenizer, max_new_tokens, **gen))
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        replies += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return replies


def prompt_conversations(messages_per_row: list[list[dict]]) -> list[list[dict]]:
    """Drop the final (reference) assistant turn so the model writes it."""
    return [m[:-1] if m and m[-1]["role"] == "assistant" else m for m in messages_per_row]


def predict_file(model, tokenizer, path: str, columns: ColumnSpec, out_path: str, max_source_length: int = 512,
                 max_new_tokens: int = 64, batch_size: int = 8, **gen) -> list[dict]:
    """Write ``generated_predictions.jsonl`` rows: prompt, label and prediction."""
    messages = validate_rows(load_rows(path), columns, path)
    prompts = prompt_conversations(messages)
    predictions = generate_replies(model, tokenizer, prompts, max_source_length, max_new_tokens, batch_size, **gen)
    records = [
        {"prompt": p[-1]["content"] if p else "", "label": m[-1]["content"] if m[-1]["role"] == "assistant" else "",
         "prediction": pred}
        for p, m, pred in zip(prompts, messages, predictions)
    ]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return records


def preview(model, tokenizer, path, columns, data_args, title: str, before: list[str] | None = None) -> list[str]:
    """Print greedy replies to the first few prompts of ``path`` so a run shows what it learned."""
    if not path or data_args.preview_samples <= 0:
        return []
    prompts = prompt_conversations(validate_rows(load_rows(path), columns, path))[: data_args.preview_samples]
    replies = generate_replies(model, tokenizer, prompts, data_args.max_source_length, data_args.max_new_tokens)
    print(f"\n=== greedy generations {title} ===")
    for i, (p, r) in enumerate(zip(prompts, replies)):
        print(f"[{i}] prompt: {p[-1]['content']}")
        if before:
            print(f"    before: {before[i]}")
        print(f"    {'after' if before else 'reply'}:  {r}")
    print()
    return replies


def run_predict(model, tokenizer, data_args, columns, training_args) -> str:
    out_path = os.path.join(training_args.output_dir, "generated_predictions.jsonl")
    beams = training_args.generation_num_beams or 1
    predict_file(model, tokenizer, data_args.test_file, columns, out_path, data_args.max_source_length,
                 data_args.max_new_tokens, training_args.predict_batch_size, num_beams=beams)
    print(f"predictions written to {out_path}")
    return out_path


def print_prompt_reply(model, tokenizer, data_args) -> str:
    reply = generate_replies(model, tokenizer, [[{"role": "user", "content": data_args.prompt}]],
                             data_args.max_source_length, data_args.max_new_tokens)[0]
    print(reply)
    return reply
