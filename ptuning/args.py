"""Command-line configuration as dataclasses, parsed by HfArgumentParser (flags, YAML or JSON files).

Flag names follow ChatGLM-6B's ``ptuning/main.py`` so existing ``train.sh`` files keep working.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field

import yaml
from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from .errors import UserError


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "Local directory or hub id of a causal LM."})
    torch_dtype: str = field(default="auto", metadata={"help": "auto, bf16, fp16 or fp32 for the frozen base."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run Python code shipped with the model. Only for sources you trust."}
    )
    quantization_bit: int | None = field(default=None, metadata={"help": "Load the base in 4 or 8 bits (bitsandbytes)."})
    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4."})
    double_quant: bool = field(default=False, metadata={"help": "Quantize the 4-bit quantization constants too."})
    ptuning_checkpoint: str | None = field(
        default=None, metadata={"help": "Prefix checkpoint directory to load (inference, or to continue training)."}
    )
    task_type: str = field(
        default="causal_lm",
        metadata={"help": "causal_lm (chat/generation), or an encoder task (BERT/RoBERTa/ELECTRA): seq_cls, "
                          "token_cls (BIO tags) or qa (SQuAD-style extractive QA).",
                  "choices": ["causal_lm", "seq_cls", "token_cls", "qa"]},
    )


@dataclass
class PrefixArguments:
    pre_seq_len: int = field(default=16, metadata={"help": "Number of prefix (virtual) tokens per layer."})
    prefix_projection: bool = field(
        default=False, metadata={"help": "Reparameterise the prefix with the Prefix-Tuning 2-layer MLP."}
    )
    prefix_hidden_size: int = field(default=512, metadata={"help": "Hidden width of the projection MLP."})
    prefix_dropout: float = field(default=0.0, metadata={"help": "Dropout on the prefix keys/values in training."})
    position_offset: bool = field(
        default=True,
        metadata={"help": "Start token positions at pre_seq_len (PEFT/HF). False reproduces ChatGLM's P-tuning."},
    )


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "json/jsonl/csv/parquet file or saved dataset dir."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data (loss with --do_eval)."})
    test_file: str | None = field(default=None, metadata={"help": "Prompts for --do_predict."})
    prompt_column: str | None = field(default=None, metadata={"help": "ChatGLM-style prompt column."})
    response_column: str | None = field(default=None, metadata={"help": "ChatGLM-style response column."})
    history_column: str | None = field(default=None, metadata={"help": "Column of [prompt, response] pairs."})
    messages_column: str | None = field(
        default=None, metadata={"help": "OpenAI-style messages column; when unset, a 'messages' or 'conversations' "
                                        "column is used if present."}
    )
    text_column: str | None = field(
        default=None, metadata={"help": "NLU: text (seq_cls), word list (token_cls) or question (qa) column."}
    )
    text_pair_column: str | None = field(
        default=None, metadata={"help": "NLU: second text (seq_cls sentence pairs) or context (qa) column."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "NLU: label (seq_cls), BIO tag list (token_cls) or answers (qa) column."}
    )
    doc_stride: int = field(default=128, metadata={"help": "qa: tokens shared by consecutive windows of a long context."})
    max_source_length: int = field(default=256, metadata={"help": "Prompt tokens kept (the end is kept)."})
    max_target_length: int = field(default=128, metadata={"help": "Response tokens kept per trained reply."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per prompt in predict/prompt mode."})
    prompt: str | None = field(default=None, metadata={"help": "One-shot mode: generate a reply to this prompt."})
    preview_samples: int = field(
        default=0, metadata={"help": "Print greedy generations for this many test/validation prompts before and after training."}
    )
    do_sample: bool = field(
        default=False, metadata={"help": "Sample instead of greedy decoding (predict, evaluate, chat, --prompt)."}
    )
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling mass (with --do_sample)."})
    top_k: int | None = field(default=None, metadata={"help": "Sample from the k likeliest tokens (with --do_sample)."})
    repetition_penalty: float | None = field(default=None, metadata={"help": "Penalty > 1 discourages repeats."})
    system_prompt: str | None = field(default=None, metadata={"help": "chat: system message opening each conversation."})
    history_file: str | None = field(
        default=None, metadata={"help": "chat: keep the conversations in this .jsonl ({\"messages\": [...]} per line)."}
    )


@dataclass
class PtuningTrainingArguments(Seq2SeqTrainingArguments):
    output_dir: str = field(default="output/ptuning", metadata={"help": "Where checkpoints and the prefix go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds a run."}
    )
    predict_batch_size: int = field(default=8, metadata={"help": "Prompts per batched generate() call."})
    skip_nonfinite_steps: bool = field(
        default=False,
        metadata={"help": "On a NaN/inf loss or gradient norm skip that update (at most 10 in a row) instead of "
                          "stopping the run. Not with --deepspeed, which applies the update inside backward."},
    )
    report_to: None | str | list[str] = field(
        default="auto",
        metadata={"help": "Integrations to log to; auto = tensorboard when it is installed, else none."},
    )

    # ---- learning-quality levers (issue 17; measured in bench/results/quality.md, see docs/quality.md)
    learning_rate: float = field(
        default=3e-2,
        metadata={"help": "Peak learning rate. A random prefix needs ~3e-2 (at the Trainer's 5e-5 it never trains its "
                          "noise away: 0%% format, 0%% facts); with --prefix_init_text use ~3e-3."},
    )
    prefix_init_text: str | None = field(
        default=None,
        metadata={"help": "Start the prefix from the base model's keys/values of this text (e.g. an instruction for "
                          "the task), truncated/repeated to --pre_seq_len tokens, instead of random values; auto: the first "
                          "training examples' tokens."},
    )
    kl_weight: float = field(
        default=0.0,
        metadata={"help": "Self-distillation: add this weight times KL(base || prefixed) on the base model's own "
                          "replies to --retention_file prompts, to keep out-of-task behaviour."},
    )
    retention_file: str | None = field(
        default=None, metadata={"help": "Prompts (any training-data format; replies are ignored) for --kl_weight."}
    )
    retention_rows: int = field(default=4, metadata={"help": "Retention conversations per step with --kl_weight."})

    def __post_init__(self):
        if self.report_to == "auto" or self.report_to == ["auto"]:
            from transformers.integrations import is_tensorboard_available

            self.report_to = "tensorboard" if is_tensorboard_available() else "none"
        if self.skip_nonfinite_steps and self.deepspeed:
            raise ValueError("--skip_nonfinite_steps: not available with --deepspeed, which applies the update inside "
                             "backward (its fp16 loss scaler skips overflowing steps by itself)")
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, PrefixArguments, DataArguments, PtuningTrainingArguments)


def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--config {path!r}: file not found")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise UserError(f"--config {path!r}: cannot parse ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"--config {path!r}: not valid UTF-8 (byte 0x{e.object[e.start]:02x}); "
                            "save the file as UTF-8") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path!r}: expected a mapping of flag names to values")
    return data


def _raise_parse_error(message: str):
    """argparse would print its whole usage text and exit; one line naming the flag is enough."""
    raise UserError(re.sub(r"^argument (--[\w-]+)(/-[\w-]+)*: ", r"\1: ", message))


def _expected(action) -> str | None:
    """What a flag's value must look like, in words; None when any string will do."""
    if action.choices:
        return "one of " + ", ".join(map(str, action.choices))
    names = {int: "an integer", float: "a number"}
    if action.type in names:
        return names[action.type]
    if getattr(action.type, "__name__", "") == "string_to_bool":
        return "true or false"
    return None


def _check_file_values(path: str, file_args: dict, actions: dict) -> None:
    """A config file's values get the checks argparse gives flags (it converts string defaults, nothing else)."""
    for key, value in file_args.items():
        action = actions[key]
        expected = _expected(action)
        if value is None or expected is None:
            continue
        many = action.nargs in ("+", "*") and isinstance(value, list)
        for item in value if many else [value]:
            try:
                if isinstance(item, (list, dict)):
                    raise ValueError
                converted = action.type(item if isinstance(item, str) else str(item))
                if action.choices and converted not in action.choices:
                    raise ValueError
            except (TypeError, ValueError):
                raise UserError(f"--config {path!r}: {key}: expected {expected}, got {value!r}") from None


def parse_namespace(argv: list[str] | None = None, classes=ARGUMENT_CLASSES):
    """The raw flag values of ``classes``; ``--config file.yaml|json`` supplies defaults that explicit flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # No abbreviations: among ~300 flags a typo that happens to be a prefix of one would silently set it.
    parser = HfArgumentParser(classes, allow_abbrev=False)
    parser.error = _raise_parse_error
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config: expected a file path")
        path = argv[i + 1]
        file_args = _read_config_file(path)
        del argv[i : i + 2]
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(file_args) - set(actions))
        if unknown:
            raise UserError(f"--config {path!r}: unknown keys {unknown}")
        _check_file_values(path, file_args, actions)
        parser.set_defaults(**file_args)
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        raise UserError(f"unknown arguments: {' '.join(rest)}{_did_you_mean(rest, parser)}")
    return namespace


def _did_you_mean(rest: list[str], parser) -> str:
    """'; did you mean --learning_rate?' for the first unknown flag that is close to a real one."""
    options = [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]
    for word in rest:
        if word.startswith("--"):
            close = difflib.get_close_matches(word.split("=", 1)[0], options, n=1, cutoff=0.75)
            if close:
                return f"; did you mean {close[0]}?"
    return ""


def parse_args(argv: list[str] | None = None):
    """Parse flags into the argument dataclasses (see ``parse_namespace``)."""
    from .memory import check_quantization_zero, zero_stage

    namespace = parse_namespace(argv)
    stage = zero_stage(getattr(namespace, "deepspeed", None))  # a broken file is named before TrainingArguments reads it
    check_quantization_zero(getattr(namespace, "quantization_bit", None), stage, getattr(namespace, "deepspeed", None))
    outputs = []
    for cls in ARGUMENT_CLASSES:
        names = {f for f in cls.__dataclass_fields__ if cls.__dataclass_fields__[f].init}
        try:
            outputs.append(cls(**{k: v for k, v in vars(namespace).items() if k in names}))
        except ValueError as e:
            raise UserError(str(e).strip().splitlines()[0]) from None
    return tuple(outputs)
