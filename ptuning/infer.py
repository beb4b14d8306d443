"""Batched, left-padded generation with a prefix: one-shot prompts, prediction files and their evaluation."""

from __future__ import annotations

import json
import os

import torch

from .data import Collator, ColumnSpec, encode_prompt, load_rows, validate_rows
from .errors import UserError

PREDICTIONS_FILE = "generated_predictions.jsonl"
RESULTS_FILE = "eval_results.json"


def generation_kwargs(tokenizer, max_new_tokens: int, do_sample: bool = False, **extra) -> dict:
    """Greedy by default, so the same checkpoint gives the same text on every run."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
    if not do_sample:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    kwargs.update(extra)
    return kwargs


@torch.no_grad()
def generation_options(data_args, num_beams: int | None = None) -> dict:
    """The generate() knobs given on the command line; greedy unless ``--do_sample``."""
    options = {"do_sample": bool(getattr(data_args, "do_sample", False))}
    if num_beams is not None:
        options["num_beams"] = num_beams
    if options["do_sample"]:
        options.update({k: getattr(data_args, k) for k in ("temperature", "top_p", "top_k")
                        if getattr(data_args, k, None) is not None})
    if getattr(data_args, "repetition_penalty", None) is not None:
        options["repetition_penalty"] = data_args.repetition_penalty
    return options


def generate_ids(model, input_ids, attention_mask, fast: bool = True, **kwargs):
    """``model.generate``'s ids; greedy one-beam calls go through ``ptuning.decode``'s static-cache loop (same ids,
    faster) unless ``fast=False``, which keeps ``generate()`` itself (the reference the decode tests compare to)."""
    if fast:
        from .decode import generate

        return generate(model, input_ids, attention_mask, **kwargs)
    return model.generate(input_ids, attention_mask=attention_mask, **kwargs)


def generate_replies(model, tokenizer, conversations: list[list[dict]], max_source_length: int = 512,
                     max_new_tokens: int = 64, batch_size: int = 8, prefix_ids=None, fast: bool = True,
                     **gen) -> list[str]:
    """Reply to each conversation (its last turn is the user's), ``batch_size`` prompts per generate() call.

    With a ``ptuning.serving.MultiPrefixModel``, ``prefix_ids`` names each conversation's prefix. ``fast=False``
    decodes with ``generate()`` instead of ``ptuning.decode`` (same greedy text).
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
        out = generate_ids(model, batch["input_ids"], batch["attention_mask"], fast,
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


def score_records(records: list[dict]) -> dict:
    """BLEU/ROUGE/exact match over the rows that carry a reference reply; empty when none does."""
    from .metrics import compute_metrics

    scored = [r for r in records if r["label"]]
    if not scored:
        return {}
    metrics = compute_metrics([r["prediction"] for r in scored], [r["label"] for r in scored])
    return {**metrics, "num_samples": len(scored)}


def write_eval_results(output_dir: str, metrics: dict) -> str:
    """Write ``eval_results.json``, keeping the Trainer's own ``eval_*`` entries (eval loss) if it wrote some."""
    path = os.path.join(output_dir, RESULTS_FILE)
    kept = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
            kept = {k: v for k, v in previous.items() if k.startswith("eval_") or k == "epoch"}
        except (json.JSONDecodeError, AttributeError, OSError):
            kept = {}
    os.makedirs(output_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({**kept, **metrics}, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def evaluate_file(model, tokenizer, path: str, columns: ColumnSpec, output_dir: str, max_source_length: int = 512,
                  max_new_tokens: int = 64, batch_size: int = 8, **gen) -> dict:
    """Generate for every row of ``path`` (batched, left-padded; greedy unless ``do_sample=True``), write
    ``generated_predictions.jsonl`` and, when rows have reference replies, ``eval_results.json``; return the metrics."""
    records = predict_file(model, tokenizer, path, columns, os.path.join(output_dir, PREDICTIONS_FILE),
                           max_source_length, max_new_tokens, batch_size, **gen)
    metrics = score_records(records)
    if metrics:
        write_eval_results(output_dir, metrics)
    return metrics


def _print_metrics(metrics: dict, output_dir: str) -> None:
    if metrics:
        print("  ".join(f"{k}: {v}" for k, v in metrics.items()))
        print(f"metrics written to {os.path.join(output_dir, RESULTS_FILE)}")


def run_predict(model, tokenizer, data_args, columns, training_args) -> str:
    out_path = os.path.join(training_args.output_dir, PREDICTIONS_FILE)
    beams = training_args.generation_num_beams or 1
    if getattr(data_args, "do_sample", False):
        from transformers import set_seed

        set_seed(training_args.seed)
    metrics = evaluate_file(model, tokenizer, data_args.test_file, columns, training_args.output_dir,
                            data_args.max_source_length, data_args.max_new_tokens, training_args.predict_batch_size,
                            **generation_options(data_args, num_beams=beams))
    print(f"predictions written to {out_path}")
    _print_metrics(metrics, training_args.output_dir)
    return out_path


def print_prompt_reply(model, tokenizer, data_args) -> str:
    reply = generate_replies(model, tokenizer, [[{"role": "user", "content": data_args.prompt}]],
                             data_args.max_source_length, data_args.max_new_tokens,
                             **generation_options(data_args))[0]
    print(reply)
    return reply


def run_evaluate(argv: list[str]) -> dict:
    """``python main.py evaluate``: load base + prefix, generate for the test file, score, write both files."""
    import ptuning
    from transformers import set_seed

    from .args import parse_args
    from .validate import check_output_writable, validate_inference

    model_args, _, data_args, training_args = parse_args(argv)
    path = data_args.test_file or data_args.validation_file
    if not model_args.model_name_or_path:
        raise UserError("evaluate: --model_name_or_path is required")
    if not model_args.ptuning_checkpoint:
        raise UserError("evaluate: --ptuning_checkpoint is required (the prefix to evaluate)")
    if not path:
        raise UserError("evaluate: --test_file is required (rows with reference replies)")
    validate_inference(model_args, training_args)  # before any weights are loaded
    check_output_writable(training_args)
    columns = ColumnSpec(data_args.prompt_column, data_args.response_column, data_args.history_column,
                         data_args.messages_column)
    validate_rows(load_rows(path), columns, path)
    model, tokenizer = ptuning.load_from_args(model_args)
    set_seed(training_args.seed)
    metrics = evaluate_file(model, tokenizer, path, columns, training_args.output_dir, data_args.max_source_length,
                            data_args.max_new_tokens, training_args.predict_batch_size,
                            **generation_options(data_args, num_beams=training_args.generation_num_beams or 1))
    print(f"predictions written to {os.path.join(training_args.output_dir, PREDICTIONS_FILE)}")
    if not metrics:
        print(f"{path}: no row has a reference reply; nothing to score")
    _print_metrics(metrics, training_args.output_dir)
    return metrics
