"""transformers.Trainer, taught that the only weights worth saving or restoring are the prefix."""

from __future__ import annotations

import logging
import os
import re
import types

import torch
from transformers import Seq2SeqTrainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import distributed
from .data import Collator
from .errors import UserError
from .export import load_encoder_weights, save_prefix
from .plots import save_training_plot
from .model import PrefixTunedModel
from .prefix import CONFIG_NAME

logger = logging.getLogger(__name__)

_gathered = distributed.gathered  # kept for callers of the old name


class PrefixTrainer(Seq2SeqTrainer):
    """Checkpoints hold prefix weights + optimizer/scheduler/RNG state: megabytes, never the base model.

    Under DeepSpeed the Trainer would call the engine's ``save_checkpoint`` (every rank's partition of the whole
    model, frozen base included) and ``load_checkpoint`` (which needs the same world size and ZeRO stage). Here the
    trainable state is gathered instead and written once, in the format of a single-process ``torch.optim`` run:
    ``prefix_*.safetensors`` + ``optimizer.pt`` + ``scheduler.pt``. Any world size, ZeRO stage or no DeepSpeed at
    all resumes from it.
    """

    @property
    def prefix_model(self) -> PrefixTunedModel:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def train(self, *args, **kwargs):
        params = list(self.prefix_model.parameters())
        trainable, total = (sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad or not only)
                            for only in (True, False))  # ds_numel: the full size of a ZeRO-3 partitioned weight
        logger.info("trainable params: %s || all params: %s || trainable%%: %.4f", f"{trainable:,}", f"{total:,}",
                    100 * trainable / total)
        return super().train(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Every rank calls this (ZeRO gathers are collectives); the main process alone writes the prefix."""
        output_dir = output_dir or self.args.output_dir
        model = self.prefix_model
        state = {f"prefix_encoder.{k}": v for k, v in distributed.trainable_state(model.prefix_encoder).items()}
        if self.args.should_save:
            save_prefix(model, output_dir, state_dict=state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.prefix_model
        if not any(distributed.zero_managed(p) for p in model.prefix_encoder.parameters()):
            load_encoder_weights(model, resume_from_checkpoint)
            return
        # Read (and validate) into a detached copy, then set module copies and ZeRO's fp32 master weights.
        shadow = types.SimpleNamespace(prefix_config=model.prefix_config,
                                       prefix_encoder=type(model.prefix_encoder)(model.prefix_config))
        load_encoder_weights(shadow, resume_from_checkpoint)
        distributed.load_trainable_state(model.prefix_encoder, shadow.prefix_encoder.state_dict())

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ---- DeepSpeed: world-size-independent optimizer state instead of engine checkpoints

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        # DeepSpeed replaces these lists by flat partitions; remember which parameter sits where.
        self._trainable_groups = [list(group["params"]) for group in optimizer.param_groups]
        return optimizer

    @property
    def trainable_groups(self) -> list:
        """Trainable parameters per optimizer param group, in the order a torch optimizer numbers them."""
        groups = getattr(self, "_trainable_groups", None)
        if groups is None:  # the optimizer comes from the DeepSpeed config: one group of every trainable parameter
            groups = [[p for p in self.prefix_model.parameters() if p.requires_grad]]
        return groups

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        state = distributed.zero_optimizer_state_dict(self.model_wrapped.optimizer, self.trainable_groups)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            # per param group, empty groups included (DeepSpeed drops them): the layout of a plain torch run
            scheduler = self.lr_scheduler.state_dict()
            scheduler = distributed.scheduler_state_for_all_groups(scheduler, self.trainable_groups)
            torch.save(scheduler, os.path.join(output_dir, SCHEDULER_NAME))

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if not self.is_deepspeed_enabled or resume_from_checkpoint is None:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        # The Trainer would ask the engine for its own checkpoint files (global_step*/), which are never written.
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        self._load_from_checkpoint(resume_from_checkpoint)
        # A subclass may load more trainable weights (a task head) into the module only: copy them to ZeRO's fp32
        # master weights too, or the next step would overwrite them with the values the run started from.
        prefix_ids = {id(p) for p in self.prefix_model.prefix_encoder.parameters()}
        distributed.master_from_module([p for g in self.trainable_groups for p in g if id(p) not in prefix_ids])
        optimizer_file = os.path.join(resume_from_checkpoint, OPTIMIZER_NAME)
        if os.path.isfile(optimizer_file):
            saved = torch.load(optimizer_file, map_location="cpu", weights_only=True)
            distributed.load_zero_optimizer_state(self.model_wrapped.optimizer, self.trainable_groups, saved)
        scheduler_file = os.path.join(resume_from_checkpoint, SCHEDULER_NAME)
        if os.path.isfile(scheduler_file):
            scheduler = torch.load(scheduler_file, weights_only=True)
            scheduler = distributed.scheduler_state_for_deepspeed(scheduler, self.trainable_groups)
            self.lr_scheduler.load_state_dict(scheduler)
        return model, train_dataloader

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """A checkpoint written by another number of processes holds other RNG files: fall back to rank 0's."""
        if checkpoint is None:
            return
        own = f"rng_state_{self.args.process_index}.pth" if self.args.world_size > 1 else "rng_state.pth"
        other = [n for n in ("rng_state.pth", "rng_state_0.pth") if os.path.isfile(os.path.join(checkpoint, n))]
        if os.path.isfile(os.path.join(checkpoint, own)) or not other:
            return super()._load_rng_state(checkpoint)
        import random

        import numpy as np
        from transformers.trainer_pt_utils import safe_globals

        with safe_globals():
            states = torch.load(os.path.join(checkpoint, other[0]), weights_only=True)
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if torch.cuda.is_available() and "cuda" in states:
            cuda = states["cuda"]
            torch.cuda.random.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)


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
    """Train with Trainer, then export the prefix into ``output_dir`` (once, from the main process)."""
    if args.world_size > 1:
        args.log_on_each_node = False  # one log line per step for the whole run, not one per node
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
    trainer.accelerator.wait_for_everyone()  # no rank leaves while another still writes
    return trainer
