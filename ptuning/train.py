"""transformers.Trainer, taught that the only weights worth saving or restoring are the prefix."""

from __future__ import annotations

import contextlib
import logging
import os
import re

from transformers import Seq2SeqTrainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .data import Collator
from .errors import UserError
from .export import load_encoder_weights, save_prefix
from .plots import save_training_plot
from .model import PrefixTunedModel, count_parameters
from .prefix import CONFIG_NAME

logger = logging.getLogger(__name__)


def _gathered(params):
    """Under ZeRO-3 the prefix is partitioned across ranks; gather it to read or write it whole."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


class PrefixTrainer(Seq2SeqTrainer):
    """Checkpoints hold prefix weights + optimizer/scheduler/RNG state: megabytes, never the base model."""

    @property
    def prefix_model(self) -> PrefixTunedModel:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def train(self, *args, **kwargs):
        trainable, total = count_parameters(self.prefix_model)
        logger.info("trainable params: %s || all params: %s || trainable%%: %.4f", f"{trainable:,}", f"{total:,}",
                    100 * trainable / total)
        return super().train(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        model = self.prefix_model
        params = list(model.prefix_encoder.parameters())
        with _gathered(params):
            state = {f"prefix_encoder.{k}": v.detach().clone() for k, v in model.prefix_encoder.state_dict().items()}
        if self.args.should_save:
            save_prefix(model, output_dir, state_dict=state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.prefix_model
        with _gathered(list(model.prefix_encoder.parameters())):
            load_encoder_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def check_output_dir(args) -> None:
    """Refuse to mix a new run into an old one unless asked (transformers 5 dropped its own flag)."""
    if not os.path.isdir(args.output_dir) or args.overwrite_output_dir or args.resume_from_checkpoint:
        return
    previous = [n for n in os.listdir(args.output_dir) if n == CONFIG_NAME or n.startswith(PREFIX_CHECKPOINT_DIR)]
    if previous:
        raise UserError(
            f"--output_dir {args.output_dir!r} already holds a run ({sorted(previous)[0]}); pass "
            "--overwrite_output_dir, --resume_from_checkpoint, or choose another directory"
        )
    if not os.access(args.output_dir, os.W_OK):
        raise UserError(f"--output_dir {args.output_dir!r}: not writable")


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint whose files are all in place; a crash mid-save leaves an incomplete one behind."""
    if not os.path.isdir(output_dir):
        return None
    steps = [
        int(m.group(1))
        for name in os.listdir(output_dir)
        if (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name))
        and all(os.path.isfile(os.path.join(output_dir, name, f)) for f in (CONFIG_NAME, "trainer_state.json"))
    ]
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{max(steps)}") if steps else None


def run_training(model: PrefixTunedModel, tokenizer, train_set, eval_set, args) -> PrefixTrainer:
    """Train with Trainer, then export the prefix into ``output_dir``."""
    trainer = PrefixTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=Collator(pad_token_id=tokenizer.pad_token_id, padding_side="right"),
    )
    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = latest_checkpoint(args.output_dir)
        if resume is None:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir!r}")
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    if eval_set is not None and args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if args.should_save:
        save_training_plot(trainer.state.log_history, args.output_dir)  # training_loss.png next to the prefix
    return trainer
