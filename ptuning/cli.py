"""The command line: ``python main.py [COMMAND] FLAGS`` (or the ``ptuning`` console script, the same thing).

No command trains (and predicts/evaluates as flagged); the commands below load a trained prefix or work on
checkpoints. ``--help`` shows the flags people use, grouped; ``--help_all`` every flag transformers adds.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

from .errors import UserError

logger = logging.getLogger("ptuning")


def _convert(argv):
    from .interop import run_convert

    return run_convert(argv)


def _evaluate(argv):
    from .infer import run_evaluate

    return run_evaluate(argv)


def _chat(argv):
    from .chat import run_chat

    return run_chat(argv)


def _plan(argv):
    from .memory import run_plan

    return run_plan(argv)


def _serve(argv):
    from .server import run_serve

    return run_serve(argv)


def _web(argv):
    from .server import run_web

    return run_web(argv)


@dataclass(frozen=True)
class Command:
    run: Callable[[list[str]], object]
    summary: str
    # Flags its --help lists, by group (None: the command prints its own argparse help).
    help_groups: tuple | None = None


MODEL_FLAGS = ("model_name_or_path", "ptuning_checkpoint", "torch_dtype", "quantization_bit", "quant_type",
               "double_quant", "trust_remote_code")
SAMPLING_FLAGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
COLUMN_FLAGS = ("prompt_column", "response_column", "history_column", "messages_column")

TRAIN_HELP = (
    ("Model", MODEL_FLAGS + ("task_type",)),
    ("Prefix", ("pre_seq_len", "prefix_projection", "prefix_hidden_size", "prefix_dropout", "no_position_offset")),
    ("Data", ("train_file", "validation_file", "test_file") + COLUMN_FLAGS + ("max_source_length",
                                                                             "max_target_length")),
    ("Training (a few of transformers' TrainingArguments)", (
        "output_dir", "overwrite_output_dir", "do_train", "do_eval", "do_predict", "learning_rate", "max_steps",
        "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "activation_checkpointing",
        "bf16", "fp16", "deepspeed", "logging_steps", "save_steps", "save_total_limit", "resume_from_checkpoint",
        "seed", "use_cpu", "report_to")),
    ("Keeping what the model knew (docs/quality.md)", ("prefix_init_text", "kl_weight", "retention_file")),
    ("Generation (--do_predict, --prompt, previews)", ("prompt", "preview_samples", "predict_batch_size")
     + SAMPLING_FLAGS),
)

COMMANDS = {
    "evaluate": Command(_evaluate, "generate for a test file with a trained prefix and score it (BLEU/ROUGE/accuracy)",
                        (("Model", MODEL_FLAGS),
                         ("Data", ("test_file",) + COLUMN_FLAGS + ("max_source_length",)),
                         ("Output", ("output_dir", "predict_batch_size", "generation_num_beams", "seed")),
                         ("Generation", SAMPLING_FLAGS))),
    "chat": Command(_chat, "talk to a trained prefix in the terminal (streamed replies, history kept)",
                    (("Model", MODEL_FLAGS),
                     ("Conversation", ("system_prompt", "history_file", "max_source_length", "seed")),
                     ("Generation", SAMPLING_FLAGS))),
    "convert": Command(_convert, "convert prefix checkpoints: ChatGLM P-tuning -> ours, PEFT prefix tuning <-> ours"),
    "serve": Command(_serve, "OpenAI-compatible server: the base and many prefixes, batched together"),
    "web": Command(_web, "the same server with a chat page at / (pick a prefix, compare it with the base)"),
    "plan": Command(_plan, "predict a run's peak GPU memory from its flags, no weights loaded (exit 1: won't fit)",
                    (("Model", ("model_name_or_path", "torch_dtype", "quantization_bit", "quant_type", "double_quant",
                                "trust_remote_code")),
                     ("Run", ("per_device_train_batch_size", "max_source_length", "max_target_length", "pre_seq_len",
                              "prefix_projection", "prefix_hidden_size", "activation_checkpointing", "deepspeed")),
                     ("Plan", ("gpu_memory", "world_size", "loss_columns")))),
}

HELP_WIDTH = 116

# One-line help where transformers' own is a paragraph.
SHORT_HELP = {
    "do_train": "Train a prefix on --train_file.",
    "do_eval": "Report the loss on --validation_file.",
    "do_predict": "Generate replies for --test_file (and score them when it has references).",
    "max_steps": "Optimizer steps (overrides --num_train_epochs).",
    "activation_checkpointing": "Recompute each layer in backward: much less memory, ~20-30% slower.",
    "bf16": "bfloat16 mixed precision (on GPUs that have it).",
    "fp16": "float16 mixed precision with loss scaling (older GPUs).",
    "deepspeed": "DeepSpeed config file: ds_configs/zero2.json, zero3.json or zero3_offload.json.",
    "save_steps": "Save a (prefix-only) checkpoint every N steps.",
    "save_total_limit": "Keep at most N checkpoints.",
    "resume_from_checkpoint": "Checkpoint directory to resume from, or 'latest'.",
    "use_cpu": "Run on the CPU even if a GPU is present.",
    "report_to": "Loggers: tensorboard, wandb, none (default: tensorboard when installed).",
    "output_dir": "Where checkpoints, the exported prefix and predictions go.",
    "generation_num_beams": "Beams for generation (1 = greedy or sampling).",
    "per_device_train_batch_size": "Rows per process and step.",
    "gradient_accumulation_steps": "Micro-batches per optimizer step.",
    "logging_steps": "Log the loss every N steps.",
    "seed": "Random seed (prefix initialisation, data order, sampling).",
    "learning_rate": "Peak learning rate; a random prefix wants ~1e-2..3e-2, far above full fine-tuning's.",
    "num_train_epochs": "Epochs over --train_file.",
    "no_position_offset": "Count token positions from 0 after the prefix, as ChatGLM's P-tuning does.",
}


def _prog() -> str:
    return "ptuning" if os.path.basename(sys.argv[0] or "") == "ptuning" else "python main.py"


def _parser(with_plan: bool = False):
    from transformers import HfArgumentParser

    from .args import ARGUMENT_CLASSES

    classes = ARGUMENT_CLASSES
    if with_plan:
        from .memory import PlanArguments

        classes = classes + (PlanArguments,)
    return HfArgumentParser(classes, prog=_prog())


def _metavar(name: str, action) -> str:
    if name == "model_name_or_path":
        return "DIR|HUB_ID"
    if name.endswith("_file") or name == "deepspeed":
        return "FILE"
    if name.endswith(("_dir", "_checkpoint")):
        return "DIR"
    return {int: "N", float: "X"}.get(action.type, "TEXT")


def _flag_rows(parser, names) -> list[tuple[str, str]]:
    by_option = {opt: action for action in parser._actions for opt in action.option_strings}
    rows = []
    for name in names:
        action = by_option.get(f"--{name}")
        if action is None:
            continue  # a flag this transformers version lacks
        takes_value = action.nargs not in (0, "?")
        text = SHORT_HELP.get(name) or (action.help or "").replace("%%", "%")
        if takes_value and action.default not in (None, "", [], False) and "default" not in text:
            text += f" (default: {action.default})"
        rows.append((f"--{name}" + (f" {_metavar(name, action)}" if takes_value else ""), text))
    return rows


def short_help(command: str | None = None) -> str:
    """The help a person reads: grouped flags of ``command`` (training when None), not transformers' 700 lines."""
    prog = _prog()
    parser = _parser(with_plan=command == "plan")
    if command is None:
        lines = [f"usage: {prog} [COMMAND] [--config FILE.yaml] FLAGS", "",
                 "Train a P-Tuning v2 prefix for a frozen chat model (no COMMAND), or use one:", ""]
        for name, cmd in COMMANDS.items():
            lines += textwrap.wrap(cmd.summary, HELP_WIDTH, initial_indent=f"  {name:<10}", subsequent_indent=" " * 12)
        lines += ["", f"'{prog} COMMAND --help' shows a command's flags. --config FILE.yaml|json supplies flags "
                      "(explicit flags win)."]
        groups = TRAIN_HELP
    else:
        cmd = COMMANDS[command]
        lines = [f"usage: {prog} {command} FLAGS", ""]
        lines += textwrap.wrap(cmd.summary[0].upper() + cmd.summary[1:] + ".", HELP_WIDTH)
        groups = cmd.help_groups
    grouped = [(title, _flag_rows(parser, names)) for title, names in groups]
    width = max(len(flag) for _, rows in grouped for flag, _ in rows) + 4
    for title, rows in grouped:
        lines += ["", f"{title}:"]
        for flag, text in rows:
            lines += textwrap.wrap(text, HELP_WIDTH, initial_indent=f"  {flag:<{width - 2}}",
                                   subsequent_indent=" " * width)
    lines += ["", f"Every flag (all of transformers' TrainingArguments too): {prog} --help_all; documentation: "
                  "README.md, docs/."]
    return "\n".join(lines)


def full_help() -> str:
    return _parser().format_help()


def _unknown_command(word: str) -> UserError:
    if word == "train":
        return UserError("training needs no command: drop 'train' and pass the flags (see --help)")
    close = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.6)
    if close:
        return UserError(f"unknown command {word!r}; did you mean {close[0]!r}? (commands: {', '.join(COMMANDS)})")
    return UserError(f"unexpected argument {word!r}: flags start with '--' and the commands are "
                     f"{', '.join(COMMANDS)} (see --help)")


def run(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        command = COMMANDS.get(argv[0])
        if command is None:
            raise _unknown_command(argv[0])
        if command.help_groups is not None and any(a in ("-h", "--help") for a in argv[1:]):
            print(short_help(argv[0]))
            return None
        return command.run(argv[1:])
    if any(a in ("-h", "--help") for a in argv):
        print(short_help())
        return None
    if "--help_all" in argv:
        print(full_help())
        return None
    from .workflow import train_and_predict

    return train_and_predict(argv)


def main(argv=None) -> int:
    """Entry point of ``python main.py`` and of the ``ptuning`` console script; returns the exit status."""
    from . import runtime

    runtime.configure_process()
    runtime.quiet_deepspeed_on_cpu()
    from . import distributed

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=distributed.log_level(),
                        stream=sys.stdout)
    try:
        run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `... --help | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        distributed.shutdown()
    return 0


def main_exit() -> None:
    """The ``ptuning`` console script."""
    sys.exit(main())
