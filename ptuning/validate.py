"""Every flag, path and config checked before a model is loaded, so a mistake costs seconds, not GPU hours.

Each check raises ``UserError`` with one line: the flag or file, what was expected, what was found.
Data rows are checked by ``ptuning.data.validate_rows``; this module covers everything else.
"""

from __future__ import annotations

import json
import logging
import os

from . import chatglm
from .errors import UserError, model_source_error
from .prefix import CONFIG_NAME, FORMAT_VERSION

logger = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")


def _at_least(flag: str, value, minimum) -> None:
    if value is not None and value < minimum:
        raise UserError(f"--{flag}: expected a value >= {minimum}, got {value}")


def check_numbers(model_args, prefix_args, data_args, training_args) -> None:
    _at_least("pre_seq_len", prefix_args.pre_seq_len, 1)
    _at_least("prefix_hidden_size", prefix_args.prefix_hidden_size, 1)
    if not 0.0 <= prefix_args.prefix_dropout < 1.0:
        raise UserError(f"--prefix_dropout: expected a value in [0, 1), got {prefix_args.prefix_dropout}")
    for flag in ("max_source_length", "max_target_length", "max_new_tokens"):
        _at_least(flag, getattr(data_args, flag), 1)
    _at_least("preview_samples", data_args.preview_samples, 0)
    for flag in ("predict_batch_size", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps"):
        _at_least(flag, getattr(training_args, flag), 1)
    if training_args.do_train:
        if not training_args.learning_rate > 0:
            raise UserError(f"--learning_rate: expected a positive value, got {training_args.learning_rate}")
        if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
            raise UserError("--max_steps / --num_train_epochs: one of them must be positive")
    if training_args.generation_num_beams is not None:
        _at_least("generation_num_beams", training_args.generation_num_beams, 1)


def check_quantization(model_args, training_args) -> None:
    bits = model_args.quantization_bit
    if bits is not None and bits not in (4, 8):
        raise UserError(f"--quantization_bit: expected 4 or 8, got {bits}")
    if model_args.quant_type not in QUANT_TYPES:
        raise UserError(f"--quant_type: expected one of {', '.join(QUANT_TYPES)}, got {model_args.quant_type!r}")
    if model_args.double_quant and bits != 4:
        raise UserError("--double_quant: only applies to --quantization_bit 4")


def check_dtype(model_args) -> None:
    from .model import DTYPES

    if model_args.torch_dtype not in DTYPES:
        raise UserError(f"--torch_dtype: expected one of {', '.join(DTYPES)}, got {model_args.torch_dtype!r}")


def check_precision(training_args, cuda_available: bool) -> None:
    """fp16 on a CPU cannot train; bf16 is the safe choice wherever the hardware has it."""
    if training_args.fp16 and training_args.bf16:
        raise UserError("--fp16 and --bf16: choose one")
    if training_args.fp16 and (training_args.use_cpu or not cuda_available):
        raise UserError("--fp16: needs a CUDA GPU; on CPU use --bf16 or full precision")


def precision_warnings(model_args, training_args, base_config, cuda_available: bool) -> list[str]:
    """fp16 overflows where bf16 would not: say so before hours are spent on a run that may end in NaN."""
    if not (training_args.fp16 or model_args.torch_dtype in ("fp16", "float16")):
        return []
    flag = "--fp16" if training_args.fp16 else f"--torch_dtype {model_args.torch_dtype}"
    warnings = []
    import torch

    if cuda_available and torch.cuda.is_bf16_supported():
        warnings.append(f"{flag}: this GPU supports bf16, which has fp32's range and cannot overflow like fp16; "
                        "prefer --bf16")
    trained_in = str(getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None) or "")
    if trained_in.endswith("bfloat16"):
        warnings.append(f"{flag}: {model_args.model_name_or_path} was trained in bfloat16; its activations can exceed "
                        "fp16's range and turn the loss into NaN; prefer --bf16 where the hardware has it")
    return warnings


def check_deepspeed_batch(training_args, world_size: int) -> None:
    """A fixed train_batch_size in the DeepSpeed config must agree with the flags (the stage is checked at parse)."""
    ds = training_args.deepspeed
    if not ds or isinstance(ds, dict) or not os.path.isfile(ds):
        return
    with open(ds, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        return
    for key, flag in (("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
                      ("gradient_accumulation_steps", "gradient_accumulation_steps")):
        value = config.get(key, "auto")
        if value != "auto" and value != getattr(training_args, flag):
            raise UserError(f"--deepspeed {ds}: {key} is {value!r} but --{flag} is {getattr(training_args, flag)}; "
                            "set it to \"auto\"")
    expected = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world_size
    batch = config.get("train_batch_size", "auto")
    if batch != "auto" and batch != expected:
        raise UserError(
            f"--deepspeed {ds}: train_batch_size is {batch} but per_device_train_batch_size × "
            f"gradient_accumulation_steps × world size = {expected}; set it to \"auto\""
        )


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def load_base_config(model_args):
    """The base model's config alone (no weights), or a one-line reason why it cannot be read."""
    from transformers import AutoConfig

    name = model_args.model_name_or_path
    if _looks_local(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise UserError(f"--model_name_or_path {name!r}: no such directory")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"--model_name_or_path {name!r}: no config.json in that directory")
    if not model_args.trust_remote_code and chatglm.is_original_chatglm(os.path.expanduser(name)):
        return chatglm.glm_config(os.path.expanduser(name))[0]  # what load_base_model will convert it to
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"--model_name_or_path {name!r}: the model ships its own code; pass --trust_remote_code "
                            "only if you trust its source") from None
        raise UserError(f"--model_name_or_path {name!r}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise model_source_error(name, e) from None


def check_lengths(base_config, prefix_args, data_args) -> None:
    limit = getattr(base_config, "max_position_embeddings", None) or getattr(base_config, "n_positions", None)
    need = prefix_args.pre_seq_len + data_args.max_source_length + data_args.max_target_length
    if limit and prefix_args.position_offset and need > limit:
        raise UserError(
            f"--pre_seq_len + --max_source_length + --max_target_length = {need} exceeds the model's "
            f"max_position_embeddings ({limit})"
        )


def check_checkpoint_dir(path: str, flag: str):
    """A prefix directory must be complete and written by a ptuning this version can read; returns its config."""
    from .export import PREFIX_WEIGHTS, check_prefix_weights, read_prefix_config

    if not os.path.isdir(path):
        raise UserError(f"--{flag} {path!r}: not a directory")
    config = read_prefix_config(path, flag)
    if config.format_version > FORMAT_VERSION:
        raise UserError(f"{os.path.join(path, CONFIG_NAME)}: format_version {config.format_version} is newer than "
                        f"this ptuning reads ({FORMAT_VERSION}); upgrade ptuning")
    if not os.path.isfile(os.path.join(path, PREFIX_WEIGHTS)):
        raise UserError(f"--{flag} {path!r}: {PREFIX_WEIGHTS} is missing; the checkpoint is incomplete")
    check_prefix_weights(path, config)
    return config


def resume_checkpoint(training_args) -> str | None:
    """The checkpoint a training run will resume from (``latest`` resolved), refused now if there is none."""
    resume = training_args.resume_from_checkpoint
    if not (training_args.do_train and resume):
        return None
    if resume == "latest":
        from .train import latest_checkpoint

        found = latest_checkpoint(training_args.output_dir)
        if found is None:
            raise UserError(f"--resume_from_checkpoint latest: no complete checkpoint in {training_args.output_dir!r}")
        return found
    return resume


def check_resume_fits(resume: str, config, prefix_args, start) -> None:
    """The prefix being trained (fresh from the flags, or ``start``, the --ptuning_checkpoint config) must have the
    shape of the one saved in the checkpoint it resumes."""
    if start is not None:
        run = (start.pre_seq_len, start.prefix_projection, start.prefix_hidden_size)
    else:
        run = (prefix_args.pre_seq_len, prefix_args.prefix_projection, prefix_args.prefix_hidden_size)
    saved = (config.pre_seq_len, config.prefix_projection, config.prefix_hidden_size)
    if not saved[1] or not run[1]:
        run, saved = run[:2], saved[:2]
    if run != saved:
        names = ("pre_seq_len", "prefix_projection", "prefix_hidden_size")
        show = lambda values: ", ".join(f"{n}={v}" for n, v in zip(names, values))  # noqa: E731
        raise UserError(f"{os.path.join(resume, CONFIG_NAME)}: {show(saved)} but this run uses {show(run)}")


def check_output_writable(training_args) -> None:
    out = training_args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out!r}: exists and is not a directory")
    parent = out if os.path.isdir(out) else os.path.dirname(os.path.abspath(out))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--output_dir {out!r}: {parent!r} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--output_dir {out!r}: not writable")


def check_modes(model_args, data_args, training_args) -> None:
    if not model_args.model_name_or_path:
        raise UserError("--model_name_or_path is required (a local directory or hub id)")
    for mode, flag, path in (("do_train", "train_file", data_args.train_file),
                             ("do_eval", "validation_file", data_args.validation_file),
                             ("do_predict", "test_file", data_args.test_file)):
        if getattr(training_args, mode) and not path:
            raise UserError(f"--{mode} needs --{flag}")


def check_quality_levers(model_args, prefix_args, training_args) -> None:
    """--prefix_init_text and --kl_weight (ptuning.prefix_init, ptuning.distill), refused where they cannot apply."""
    init, kl = getattr(training_args, "prefix_init_text", None), getattr(training_args, "kl_weight", 0.0)
    if not (init or kl or getattr(training_args, "retention_file", None)):
        return
    if model_args.task_type != "causal_lm":
        raise UserError(f"--prefix_init_text / --kl_weight: only for causal_lm prefixes, not --task_type "
                        f"{model_args.task_type}")
    if init and model_args.ptuning_checkpoint:
        raise UserError("--prefix_init_text: would overwrite the prefix loaded from --ptuning_checkpoint; drop one")
    if init and prefix_args.prefix_projection:
        raise UserError("--prefix_init_text: sets the prefix's keys/values directly, which --prefix_projection "
                        "reparameterises through an MLP; drop one")
    if kl < 0:
        raise UserError(f"--kl_weight: expected a value >= 0, got {kl}")
    _at_least("retention_rows", training_args.retention_rows, 1)
    if kl:
        from .memory import zero_stage

        if zero_stage(training_args.deepspeed) == 3:
            raise UserError("--kl_weight: the base writes its own replies to the retention prompts before training, "
                            "which ZeRO-3's partitioned base cannot do; use ZeRO-2 or plain DDP")
    if getattr(training_args, "retention_file", None):
        if not kl:
            raise UserError("--retention_file: only used with --kl_weight > 0")
        from .distill import retention_conversations

        retention_conversations(training_args.retention_file)  # a bad file is named before any weight loads


def validate_flags(model_args, prefix_args, data_args, training_args, cuda_available: bool = False,
                   world_size: int = 1) -> None:
    """Checks every task type shares (causal LM and NLU): numbers, precision, quantization, DeepSpeed, output."""
    check_numbers(model_args, prefix_args, data_args, training_args)
    check_quality_levers(model_args, prefix_args, training_args)
    check_quantization(model_args, training_args)
    check_dtype(model_args)
    check_precision(training_args, cuda_available)
    check_deepspeed_batch(training_args, world_size)
    check_output_writable(training_args)


def validate_run(model_args, prefix_args, data_args, training_args, cuda_available: bool = False,
                 world_size: int = 1):
    """All checks that need no weights; returns the base config so callers need not read it twice."""
    check_modes(model_args, data_args, training_args)
    validate_flags(model_args, prefix_args, data_args, training_args, cuda_available, world_size)
    start = None
    if model_args.ptuning_checkpoint:
        start = check_checkpoint_dir(model_args.ptuning_checkpoint, "ptuning_checkpoint")
    resume = resume_checkpoint(training_args)
    saved = check_checkpoint_dir(resume, "resume_from_checkpoint") if resume else None
    if saved is not None:
        check_resume_fits(resume, saved, prefix_args, start)
    base_config = load_base_config(model_args)
    from .export import check_fits_base
    from .model import check_architecture

    check_architecture(base_config)
    for path, config in ((model_args.ptuning_checkpoint, start), (resume, saved)):
        if config is not None:
            check_fits_base(config, base_config, path)
    check_lengths(base_config, start or prefix_args, data_args)  # a loaded prefix brings its own pre_seq_len
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict or data_args.prompt):
        raise UserError("nothing to do: pass --do_train, --do_eval, --do_predict or --prompt")
    for warning in precision_warnings(model_args, training_args, base_config, cuda_available):
        logger.warning(warning)
    return base_config


def validate_inference(model_args, training_args):
    """evaluate / chat: flags, the prefix directory and its fit to the base, all before any weights load."""
    check_quantization(model_args, training_args)
    check_dtype(model_args)
    _at_least("predict_batch_size", training_args.predict_batch_size, 1)
    config = check_checkpoint_dir(model_args.ptuning_checkpoint, "ptuning_checkpoint")
    base_config = load_base_config(model_args)
    from .export import check_fits_base
    from .model import check_architecture

    check_architecture(base_config)
    check_fits_base(config, base_config, model_args.ptuning_checkpoint)
    return base_config
