"""Training, evaluation and prediction for ``--task_type seq_cls|token_cls|qa`` (``main.py`` hands over here)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding, set_seed

from ..args import DataArguments
from ..errors import UserError
from ..train import PrefixTrainer, _gathered, check_output_dir, train_resumably
from . import data as nlu_data
from . import metrics as nlu_metrics
from . import qa
from .model import check_length, encoder_config, load, load_head, position_budget, read_nlu_config, save_nlu

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")


class NluTrainer(PrefixTrainer):
    """``PrefixTrainer`` whose checkpoints also carry the task head (``task_head.safetensors``)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        model = self.prefix_model
        trainable = dict(model.named_parameters())
        names = [f"prefix_encoder.{k}" for k, _ in model.prefix_encoder.named_parameters()]
        names += [f"base.{n}" for n in model.head_names()]
        with _gathered([trainable[n] for n in names]):
            state = {n: trainable[n].detach().clone() for n in names}
        if self.args.should_save:
            save_nlu(model, output_dir, state_dict=state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.prefix_model
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        head = dict(model.base.named_parameters())
        with _gathered([head[n] for n in model.head_names()]):
            load_head(model, resume_from_checkpoint)


class _InputsOnly:
    """Drop the bookkeeping keys (word ids, offsets) before the real collator pads the model inputs."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        return self.collator([{k: v for k, v in f.items() if k in MODEL_INPUTS} for f in features])


def collator(task_type: str, tokenizer):
    if task_type == "token_cls":
        return _InputsOnly(DataCollatorForTokenClassification(tokenizer))
    return _InputsOnly(DataCollatorWithPadding(tokenizer))


def compute_metrics_fn(task_type: str, labels: list):
    """Metrics from Trainer's (logits, label ids) for in-training evaluation; QA reports its loss only."""
    if task_type == "qa":
        return None

    def compute(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted, gold = np.argmax(logits, axis=-1), prediction.label_ids
        if task_type == "seq_cls":
            return nlu_metrics.classification_metrics(gold.tolist(), predicted.tolist())
        gold_tags, pred_tags = [], []
        for g_row, p_row in zip(gold, predicted):
            keep = g_row != -100
            gold_tags.append([str(labels[i]) for i in g_row[keep]])
            pred_tags.append([str(labels[i]) for i in p_row[keep]])
        return nlu_metrics.entity_metrics(gold_tags, pred_tags)

    return compute


def predict(trainer, task_type: str, labels: list, tokenizer, examples: list[dict], max_length: int,
            doc_stride: int) -> tuple[list, dict]:
    """(one prediction per example, metrics against the gold labels the examples carry — {} if none do)."""
    features = nlu_data.encode(tokenizer, examples, task_type, labels, max_length, doc_stride, with_labels=False)
    logits = trainer.predict(features).predictions
    if task_type == "seq_cls":
        predicted = [labels[i] for i in np.argmax(logits, axis=-1)]
        gold = [e["label"] for e in examples if e["label"] is not None]
        scored = len(gold) == len(examples)
        return predicted, nlu_metrics.classification_metrics(gold, predicted) if scored else {}
    if task_type == "token_cls":
        predicted = nlu_data.word_predictions(features, np.argmax(logits, axis=-1), labels, examples)
        scored = all(e["tags"] is not None for e in examples)
        return predicted, nlu_metrics.entity_metrics([e["tags"] for e in examples], predicted) if scored else {}
    start_logits, end_logits = logits
    answers = qa.postprocess_predictions(examples, features, start_logits, end_logits)
    predicted = [answers[e["id"]] for e in examples]
    if not all(e["answers"] is not None for e in examples):
        return predicted, {}
    return predicted, nlu_metrics.squad_metrics(answers, {e["id"]: e["answers"]["text"] for e in examples})


def write_predictions(path: str, task_type: str, examples: list[dict], predicted: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for e, p in zip(examples, predicted):
            if task_type == "seq_cls":
                row = {"text": e["text"], **({"text_pair": e["text_pair"]} if "text_pair" in e else {}),
                       "label": e["label"], "prediction": p}
            elif task_type == "token_cls":
                row = {"tokens": e["tokens"], "label": e["tags"], "prediction": p}
            else:
                row = {"id": e["id"], "question": e["question"],
                       "label": e["answers"]["text"] if e["answers"] is not None else None, "prediction": p}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _report(trainer, split: str, metrics: dict) -> None:
    metrics = {f"{split}_{k}": round(v, 4) for k, v in metrics.items()}
    trainer.log_metrics(split, metrics)
    if trainer.args.should_save:
        trainer.save_metrics(split, metrics)


def run_nlu(model_args, prefix_args, data_args, training_args) -> None:
    """Validate every file, load encoder + prefix, train, export prefix + head, evaluate, predict."""
    task_type = model_args.task_type
    columns = nlu_data.NluColumns(data_args.text_column, data_args.text_pair_column, data_args.label_column)
    if not model_args.model_name_or_path:
        raise UserError("--model_name_or_path is required (a local directory or hub id)")
    if training_args.do_train and not data_args.train_file:
        raise UserError("--do_train needs --train_file")
    if training_args.do_eval and not data_args.validation_file:
        raise UserError("--do_eval needs --validation_file")
    if training_args.do_predict and not data_args.test_file:
        raise UserError("--do_predict needs --test_file")
    if data_args.prompt:
        raise UserError(f"--prompt is for causal LMs; use --do_predict --test_file with --task_type {task_type}")
    read = lambda path, need: nlu_data.read_examples(path, task_type, columns, need) if path else None  # noqa: E731
    train = read(data_args.train_file, True) if training_args.do_train else None
    dev = read(data_args.validation_file, True) if data_args.validation_file else None
    test = read(data_args.test_file, False) if training_args.do_predict else None
    if training_args.do_train:
        check_output_dir(training_args)

    ckpt = model_args.ptuning_checkpoint
    if ckpt:
        labels = read_nlu_config(ckpt, task_type).labels
        for path, examples in ((data_args.train_file, train), (data_args.validation_file, dev)):
            if examples:
                nlu_data.check_labels(examples, task_type, labels, path)
    elif training_args.do_train:
        labels = nlu_data.label_list(task_type, train, *([dev] if dev else []))
    else:
        raise UserError(f"--task_type {task_type} without --do_train needs --ptuning_checkpoint (a trained prefix)")

    max_length, stride = data_args.max_source_length, data_args.doc_stride
    pre_seq_len = read_nlu_config(ckpt).pre_seq_len if ckpt else prefix_args.pre_seq_len
    config = encoder_config(model_args)
    budget = position_budget(config, pre_seq_len)
    if max_length == DataArguments.__dataclass_fields__["max_source_length"].default and max_length > budget > 0:
        logger.warning("--max_source_length %d (the default) leaves no room for the %d-token prefix in this "
                       "%s's %d positions; using %d", max_length, pre_seq_len, config.model_type,
                       config.max_position_embeddings, budget)
        max_length = budget
    check_length(config, pre_seq_len, max_length)
    if task_type == "qa" and not 0 < stride < max_length:
        raise UserError(f"--doc_stride: expected 0 < doc_stride < --max_source_length ({max_length}), got {stride}")

    set_seed(training_args.seed)
    model, tokenizer = load(model_args.model_name_or_path, ckpt, task_type=task_type, labels=labels,
                            torch_dtype=model_args.torch_dtype, trust_remote_code=model_args.trust_remote_code,
                            for_training=training_args.do_train, **vars(prefix_args))
    logger.info("task %s, labels %s", task_type, labels)

    training_args.label_names = ["start_positions", "end_positions"] if task_type == "qa" else ["labels"]
    encode = lambda examples: nlu_data.encode(tokenizer, examples, task_type, labels, max_length, stride)  # noqa: E731
    trainer = NluTrainer(
        model=model,
        args=training_args,
        train_dataset=encode(train) if train else None,
        eval_dataset=encode(dev) if dev else None,
        data_collator=collator(task_type, tokenizer),
        compute_metrics=compute_metrics_fn(task_type, labels),
    )
    evaluate = training_args.do_eval and dev is not None
    if training_args.do_train:
        if evaluate:
            _report(trainer, "eval_before_training", predict(trainer, task_type, labels, tokenizer, dev, max_length,
                                                             stride)[1])
        result = train_resumably(trainer, training_args)
        trainer.save_model(training_args.output_dir)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
    if evaluate:
        _report(trainer, "eval", predict(trainer, task_type, labels, tokenizer, dev, max_length, stride)[1])
    if training_args.do_predict:
        predicted, scores = predict(trainer, task_type, labels, tokenizer, test, max_length, stride)
        os.makedirs(training_args.output_dir, exist_ok=True)
        out = os.path.join(training_args.output_dir, PREDICTIONS_FILE)
        if training_args.should_save:
            write_predictions(out, task_type, test, predicted)
        if scores:
            _report(trainer, "predict", scores)
        logger.info("wrote %d predictions to %s", len(predicted), out)
