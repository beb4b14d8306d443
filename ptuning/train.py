"""transformers.Trainer, taught that the only weights worth saving or restoring are the prefix."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import types

import torch
from transformers import Seq2SeqTrainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

from . import distributed
from .data import Collator
from .errors import UserError
from .export import load_encoder_weights, save_prefix
from .plots import save_training_plot
from .model import PrefixTunedModel
from .prefix import CONFIG_NAME

logger = logging.getLogger(__name__)

_gathered = distributed.gathered  # kept for callers of the old name

STAGING_SUFFIX = ".partial"
JIT_SENTINEL = "checkpoint-is-incomplete.txt"  # transformers' JIT checkpoint marks a save in progress with it
MAX_SKIPPED_IN_A_ROW = 10


class TrainingDiverged(UserError):
    """A non-finite loss or gradient norm: the run stops instead of training on garbage."""

    exit_code = 3


class Preempted(UserError):
    """SIGTERM arrived: a checkpoint was saved and the run stopped early (exit status 128 + SIGTERM)."""

    exit_code = 143


def parameter_count(p) -> int:
    """Values a weight stands for: a ZeRO-3 partition or a packed 4-bit tensor holds fewer than that."""
    if hasattr(p, "ds_numel"):
        return p.ds_numel
    quant_state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: two values per stored byte
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return quant_state.shape.numel()
    return p.numel()


def staging_dir(final: str) -> str:
    """The hidden sibling a checkpoint is written into; ``checkpoint-*`` globs and ``latest`` never see it."""
    head, name = os.path.split(final)
    return os.path.join(head, f".{name}{STAGING_SUFFIX}")


def _fsync_tree(path: str) -> None:
    for name in os.listdir(path):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def commit_checkpoint(staging: str, final: str) -> None:
    """Rename a fully written checkpoint into place; an older copy of the same step is swapped out, not merged."""
    _fsync_tree(staging)
    if os.path.exists(final):
        old = staging_dir(final) + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


def remove_partial_checkpoints(output_dir: str) -> None:
    """Staging directories left by a run killed mid-save: never complete, never resumed from."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(f".{PREFIX_CHECKPOINT_DIR}-") and STAGING_SUFFIX in name:
            logger.warning("removing %s, left by a save that was interrupted", os.path.join(output_dir, name))
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


class _SigtermSync(TrainerCallback):
    """After the update, on every rank: a SIGTERM that any rank saw (agreed in ``_check_step``) becomes the JIT
    checkpoint request, which transformers' callback then carries out at this step's end."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer._sigterm_agreed:
            self.trainer._sigterm_agreed = self.trainer._sigterm_pending = False
            self.trainer._jit_manager.is_checkpoint_requested = True


class PrefixTrainer(Seq2SeqTrainer):
    """Checkpoints hold prefix weights + optimizer/scheduler/RNG state: megabytes, never the base model.

    Under DeepSpeed the Trainer would call the engine's ``save_checkpoint`` (every rank's partition of the whole
    model, frozen base included) and ``load_checkpoint`` (which needs the same world size and ZeRO stage). Here the
    trainable state is gathered instead and written once, in the format of a single-process ``torch.optim`` run:
    ``prefix_*.safetensors`` + ``optimizer.pt`` + ``scheduler.pt``. Any world size, ZeRO stage or no DeepSpeed at
    all resumes from it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.preempted_at: int | None = None
        self._nonfinite_loss: float | None = None
        self._skipped_in_a_row = 0
        self._jit_manager = None
        self._sigterm_pending = self._sigterm_agreed = False
        for callback in self.callback_handler.callbacks:
            if getattr(callback, "jit_manager", None) is not None:  # --enable_jit_checkpoint: SIGTERM → save → stop
                self._jit_manager = manager = callback.jit_manager
                save = manager.execute_jit_checkpoint

                def execute_and_remember(save=save):
                    self.preempted_at = self.state.global_step
                    save()

                manager.execute_jit_checkpoint = execute_and_remember
                # The signal only marks a request; every rank acts on it at the same step (see _check_step).
                manager._enable_checkpoint = lambda: setattr(self, "_sigterm_pending", True)
                self.add_callback(_SigtermSync(self))

    distiller = None  # a ptuning.distill.RetentionDistiller adds its KL term to every training loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.distiller is None or not model.training:
            return out
        # The task loss is already divided over the accumulated micro-batches when it is normalised by
        # num_items_in_batch (the Trainer then does not divide it again); the KL term must be too.
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        kl = self.distiller.loss(self.prefix_model) / (self.current_gradient_accumulation_steps if scaled else 1)
        return (out[0] + kl, out[1]) if return_outputs else out + kl

    @property
    def prefix_model(self) -> PrefixTunedModel:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def train(self, *args, **kwargs):
        params = list(self.prefix_model.parameters())
        trainable, total = (sum(parameter_count(p) for p in params if p.requires_grad or not only)
                            for only in (True, False))
        logger.info("trainable params: %s || all params: %s || trainable%%: %.4f", f"{trainable:,}", f"{total:,}",
                    100 * trainable / total)
        try:
            return super().train(*args, **kwargs)
        except UserError:
            for callback in self.callback_handler.callbacks:  # end the progress bar so the error gets its own line
                if getattr(callback, "training_bar", None) is not None:
                    callback.training_bar.close()
                    callback.training_bar = None
            raise

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Every rank calls this (ZeRO gathers are collectives); the main process alone writes the prefix."""
        output_dir = output_dir or self.args.output_dir
        model = self.prefix_model
        state = {f"prefix_encoder.{k}": v for k, v in distributed.trainable_state(model.prefix_encoder).items()}
        if self.args.should_save:
            save_prefix(model, output_dir, state_dict=state)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into a hidden sibling directory and renamed into place once complete:
        a run killed mid-save leaves the previous checkpoint as the newest one and nothing that looks complete."""
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging = staging_dir(final)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.store_flos()
        self.save_model(staging, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)  # every rank writes its own file
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and \
                self.state.best_global_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if best == final or os.path.exists(best):
                self.state.best_model_checkpoint = best
        if self.args.should_save:
            for cb in [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]:
                name, cb_state = cb.__class__.__name__, cb.state()
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(cb_state)
                else:
                    self.state.stateful_callbacks[name] = cb_state
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            commit_checkpoint(staging, final)
        self.accelerator.wait_for_everyone()
        if self.args.local_process_index == 0 and os.path.isdir(staging):  # another node, without shared storage
            commit_checkpoint(staging, final)
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def floating_point_ops(self, inputs) -> int:
        """A frozen base costs its forward (2 N per token) and the backward to its inputs (2 N), not Trainer's 6 N:
        no weight gradient is computed. N counts the base's non-embedding parameters; the prefix adds ~0."""
        ids = inputs.get("input_ids")
        base = getattr(self.model, "base", None)
        if ids is None or base is None or not hasattr(base, "num_parameters"):
            return super().floating_point_ops(inputs)
        return 4 * ids.numel() * base.num_parameters(exclude_embeddings=True)

    # ---- divergence guard: a non-finite loss or gradient norm stops the run (or skips the update, by flag)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._nonfinite_loss is None and not torch.isfinite(loss).all():
            self._nonfinite_loss = loss.detach().float().sum().item()
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._check_step(grad_norm)
        return grad_norm

    def _check_step(self, grad_norm) -> None:
        """Once per optimizer step, on every rank, between backward and the update. One all-reduce carries both this
        step's non-finite flag and a pending SIGTERM: a rank acting alone on either would hang the others."""
        loss, self._nonfinite_loss = self._nonfinite_loss, None
        norm = float(grad_norm) if grad_norm is not None else 0.0
        scaler = getattr(self.accelerator, "scaler", None)
        norm_bad = not math.isfinite(norm) and scaler is None  # fp16's loss scaler skips overflowing steps itself
        flags = [float(loss is not None or norm_bad), float(self._sigterm_pending)]
        if self.args.world_size > 1:
            flags = self.accelerator.reduce(torch.tensor(flags, device=self.args.device), reduction="sum").tolist()
        self._sigterm_agreed = self._sigterm_agreed or flags[1] > 0
        if not flags[0]:
            self._skipped_in_a_row = 0
            return
        step = self.state.global_step + 1
        if loss is not None:
            what = f"the loss is {loss}"
        elif norm_bad:
            what = f"the gradient norm is {norm}"
        else:
            what = "the loss is not finite on another rank"
        if self.args.skip_nonfinite_steps and not self.is_deepspeed_enabled and \
                self._skipped_in_a_row < MAX_SKIPPED_IN_A_ROW:
            self._skipped_in_a_row += 1
            self.optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are left alone by the step
            logger.warning("step %d: %s; update skipped (%d in a row)", step, what, self._skipped_in_a_row)
            return
        last = latest_checkpoint(self._get_output_dir(trial=None))
        kept = f"{last} is the last good checkpoint" if last else "no checkpoint was saved yet"
        raise TrainingDiverged(f"step {step}: {what}; training stopped and {kept}. {self._divergence_advice()}")

    def _divergence_advice(self) -> str:
        lr = f"--learning_rate (now {self.args.learning_rate:g})"
        if self.args.fp16:
            return f"fp16 overflows easily: use --bf16 if the hardware has it, or lower {lr}"
        if self._skipped_in_a_row:
            return f"{self._skipped_in_a_row} updates in a row were skipped; lower {lr} or check the data"
        return f"Lower {lr}, set --max_grad_norm, or check the data for empty targets"

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
        and all(os.path.isfile(os.path.join(output_dir, name, f)) for f in (CONFIG_NAME, TRAINER_STATE_NAME))
        and not os.path.exists(os.path.join(output_dir, name, JIT_SENTINEL))
    ]
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{max(steps)}") if steps else None


def train_resumably(trainer: PrefixTrainer, args):
    """``trainer.train`` from ``--resume_from_checkpoint DIR|latest``; a SIGTERM-saved stop raises ``Preempted``."""
    if args.should_save:
        remove_partial_checkpoints(args.output_dir)
    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = latest_checkpoint(args.output_dir)
        if resume is None:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir!r}")
    result = trainer.train(resume_from_checkpoint=resume)
    if trainer.preempted_at is not None:
        trainer.accelerator.wait_for_everyone()
        raise Preempted(f"SIGTERM: saved {PREFIX_CHECKPOINT_DIR}-{trainer.preempted_at} in {args.output_dir} and "
                        "stopped; continue with --resume_from_checkpoint latest")
    return result


def apply_quality_levers(trainer: PrefixTrainer, tokenizer, args) -> None:
    """``--prefix_init_text`` and ``--kl_weight`` (see ptuning.prefix_init and ptuning.distill)."""
    model = trainer.prefix_model
    if getattr(args, "prefix_init_text", None):
        from .prefix_init import init_prefix_from_text

        examples = trainer.train_dataset["input_ids"][:64] if trainer.train_dataset is not None else None
        init_prefix_from_text(model, tokenizer, args.prefix_init_text, examples)
    if getattr(args, "kl_weight", 0.0):
        from .distill import RetentionDistiller, retention_conversations

        trainer.distiller = RetentionDistiller(model, tokenizer, retention_conversations(args.retention_file),
                                               args.kl_weight, args.retention_rows, seed=args.seed)


def run_training(model: PrefixTunedModel, tokenizer, train_set, eval_set, args) -> PrefixTrainer:
    """Train with Trainer, then export the prefix into ``output_dir`` (once, from the main process)."""
    if args.world_size > 1:
        args.log_on_each_node = False  # one log line per step for the whole run, not one per node
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False  # nothing to pin for; DataLoader would warn about it
    trainer = PrefixTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=Collator(pad_token_id=tokenizer.pad_token_id, padding_side="right"),
    )
    apply_quality_levers(trainer, tokenizer, args)
    result = train_resumably(trainer, args)
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
