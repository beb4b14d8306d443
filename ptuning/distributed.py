"""Multi-process runs (torchrun / the deepspeed launcher, DDP or DeepSpeed ZeRO-1/2/3): rank queries, launch-time
setup, world-size-independent trainable state, and a clean exit.

Only the prefix is trained, so its whole state (weights and optimizer moments) is a few megabytes even for a 6B
base. Checkpoints therefore hold it unpartitioned, in the format a single-process ``torch.optim`` run writes:
any world size and any ZeRO stage (or none) can resume any checkpoint, and nothing of the frozen base is ever
written. Under ZeRO the partitioned state is gathered with DeepSpeed's ``safe_get_full_*`` helpers (collectives:
every rank calls them, in the same order) and scattered back with ``safe_set_full_*``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- ranks


def rank() -> int:
    """Global rank, from the launcher's environment (torchrun and the deepspeed launcher set it; DeepSpeed's MPI
    discovery too), so it is known before the process group exists and without importing torch."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def log_level() -> int:
    """INFO on rank 0, WARNING elsewhere: one copy of every progress message per run."""
    return logging.INFO if is_main_process() else logging.WARNING


# ---------------------------------------------------------------- launch / exit


def _flag(argv, name: str) -> bool:
    """Whether ``--name`` is given (and not ``--name false``) on the command line or in its ``--config`` file."""
    for i, a in enumerate(argv):
        if a == f"--{name}":
            return not (i + 1 < len(argv) and argv[i + 1].lower() in ("false", "0", "no"))
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1].lower() not in ("false", "0", "no", "")
    value = _config(argv).get(name)
    return bool(value) and str(value).lower() not in ("false", "0", "no")


def _config(argv) -> dict:
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return {}
    try:
        from .args import _read_config_file

        return _read_config_file(argv[argv.index("--config") + 1])
    except Exception:  # parse_args reports a bad config file properly
        return {}


def prepare(argv) -> None:
    """Set DeepSpeed up for a CPU-only machine; call before the arguments are parsed.

    On GPUs accelerate starts DeepSpeed's communication while the arguments are parsed. With ``--use_cpu`` (which a
    multi-process run on CPUs needs: without it accelerate counts one process while DeepSpeed runs all of them) it
    only starts torch's gloo group, and DeepSpeed's own layer stays down until the engine is built, too late for
    ZeRO-3, which partitions the base model as it is loaded. So start it here. DeepSpeed would also JIT-compile a
    shared-memory all-reduce op for the CPU on its first start (about a minute on a fresh machine); training never
    uses it (gloo does the collectives), so it is marked unavailable.
    """
    from .errors import UserError

    if not _flag(argv, "deepspeed"):
        return
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return  # parse_args reports it
    if get_accelerator().device_name() != "cpu":
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if world_size() > 1 and not _flag(argv, "use_cpu"):
        raise UserError("DeepSpeed on a machine without GPUs needs --use_cpu (scripts/train.sh adds it)")
    if "MASTER_ADDR" in os.environ:  # started by a launcher (torchrun, deepspeed)
        import deepspeed.comm

        if not deepspeed.comm.is_initialized():
            deepspeed.comm.init_distributed(auto_mpi_discovery=False)


def shutdown() -> None:
    """Destroy the process group before the interpreter exits (skipping it sometimes ends gloo runs in SIGABRT)."""
    dist = sys.modules.get("torch.distributed")  # never imported: nothing to destroy
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def zero_stage(training_args) -> int | None:
    """The ZeRO stage of a DeepSpeed run, None without DeepSpeed."""
    config = getattr(training_args, "hf_deepspeed_config", None)
    if config is None:
        return None
    return int(config.config.get("zero_optimization", {}).get("stage", 0))


def generation_skipped(training_args) -> str | None:
    """Why this process must not generate text after loading/training, or None if it may.

    Only rank 0 prints and writes predictions. Under ZeRO-3 the base weights are partitioned across ranks (from the
    moment the model is loaded), so rank 0 alone cannot run them; the exported prefix is predicted from in a
    separate single-process run (scripts/train.sh does this).
    """
    if not is_main_process():
        return "not the main process"
    if zero_stage(training_args) == 3:
        return ("ZeRO-3 partitions the base weights across processes; predict from the exported prefix in a "
                "single process: python main.py --model_name_or_path MODEL --ptuning_checkpoint "
                f"{training_args.output_dir} --do_predict --test_file FILE")
    return None


# ---------------------------------------------------------------- ZeRO state <-> full tensors


def gathered(params):
    """Under ZeRO-3 parameters are partitioned across ranks; gather them to read or write them whole (a collective).
    Changes made inside are kept from rank 0."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def zero_managed(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def full_fp32_param(param) -> torch.Tensor:
    """The whole fp32 master value of a trainable parameter (a collective under ZeRO)."""
    import torch

    if zero_managed(param):
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        if value is not None:
            return value.detach().to("cpu", torch.float32).reshape(param.ds_shape if hasattr(param, "ds_id")
                                                                   else param.shape)
    return param.detach().to("cpu", torch.float32)


def trainable_state(module: torch.nn.Module) -> dict:
    """``module.state_dict()`` with full fp32 values, gathered from ZeRO partitions / master weights.

    Every rank must call it (ZeRO gathers are collectives). Under ZeRO with bf16/fp16 the module holds low-precision
    copies; the optimizer's fp32 master weights are what training actually continues from, so they are exported.
    """
    import torch

    state = {}
    frozen = [p for p in module.parameters() if not p.requires_grad]
    for name, param in module.named_parameters():
        if param.requires_grad:
            state[name] = full_fp32_param(param)
    with gathered(frozen):
        for name, param in module.named_parameters():
            if not param.requires_grad:
                state[name] = param.detach().to("cpu", torch.float32).clone()
    for name, buf in module.named_buffers():
        state[name] = buf.detach().cpu().clone()
    return state


def load_trainable_state(module: torch.nn.Module, state: dict) -> None:
    """Put full values into a module that DeepSpeed may have partitioned: module copies and fp32 master weights.

    Every rank passes the same ``state``; no communication is needed (each rank takes its own partition).
    """
    import torch

    params = dict(module.named_parameters())
    unexpected = sorted(set(state) - set(params) - {n for n, _ in module.named_buffers()})
    missing = sorted(set(params) - set(state))
    if unexpected or missing:
        raise RuntimeError(f"state does not match the module: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, param in params.items():
            value = state[name].to(torch.float32)
            if zero_managed(param) and param.requires_grad:
                _set_full(param, value)  # the fp32 master copy the optimizer steps
            if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of the module copy
                param.ds_tensor.data.copy_(_local_partition(param, value))
            else:
                param.data.copy_(value.reshape(param.shape))
        for name, buf in module.named_buffers():
            if name in state:
                buf.copy_(state[name])


def master_from_module(params: list) -> None:
    """Set ZeRO's fp32 master weights of ``params`` from the module's (possibly low-precision) copies."""
    import torch

    for param in params:
        if not (zero_managed(param) and param.requires_grad):
            continue
        if hasattr(param, "ds_id"):  # ZeRO-3: the module copy's partition is this rank's part of the master
            from deepspeed.utils import safe_set_local_fp32_param

            safe_set_local_fp32_param(param, param.ds_tensor.detach().to(torch.float32))
        else:
            _set_full(param, param.detach().to(torch.float32))


def _local_partition(param, value):
    """This rank's ZeRO-3 partition of the full ``value`` of ``param`` (zero-padded at the end, as DeepSpeed pads)."""
    import torch

    size = param.ds_tensor.numel()
    start = size * torch.distributed.get_rank(group=param.ds_process_group)
    flat = value.reshape(-1)
    part = torch.zeros(size, dtype=param.ds_tensor.dtype, device=param.ds_tensor.device)
    if start < flat.numel():
        count = min(size, flat.numel() - start)
        part[:count] = flat[start:start + count]
    return part


def _set_full(param, value, key: str | None = None) -> None:
    """Set the fp32 master weight (``key`` None) or an optimizer state of ``param`` from its full value.

    ZeRO-3 goes through the local-partition API: DeepSpeed 0.19's full-value setters cut the value without the
    padding the last rank's partition has, and fail for sizes the world size does not divide."""
    import torch
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
                                 safe_set_local_optimizer_state)

    if hasattr(param, "ds_id"):
        fp32 = _local_partition(param, value).to(torch.float32)
        if key is None:
            safe_set_local_fp32_param(param, fp32)
        else:
            safe_set_local_optimizer_state(param, fp32, key)
    else:
        value = value.to(torch.float32).to(param.device)
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)


def _flat_partitions(zero_optimizer) -> list:
    """The fp32 tensors the wrapped torch optimizer steps (this rank's partitions), i.e. its state's keys."""
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 lists them only while stepping
    if flats is None:
        flats = [flat for group in zero_optimizer.optimizer.param_groups for flat in group["params"]]
    return list(flats)


def _inner_groups(inner, groups) -> list:
    """The wrapped torch optimizer's param group for each of ``groups`` (None for an empty one: DeepSpeed drops
    param groups without parameters, a plain torch optimizer keeps them)."""
    nonempty = [i for i, g in enumerate(groups) if g]
    if len(inner.param_groups) != len(nonempty):
        raise ValueError(f"DeepSpeed's optimizer has {len(inner.param_groups)} param groups, expected {len(nonempty)}")
    found = dict(zip(nonempty, inner.param_groups))
    return [found.get(i) for i in range(len(groups))]


def zero_optimizer_state_dict(zero_optimizer, groups: list[list[torch.nn.Parameter]]) -> dict:
    """The state dict a plain ``torch.optim`` optimizer over ``groups`` would have, built from a ZeRO optimizer.

    ``groups`` are the trainable parameters per param group as the Trainer created them (before DeepSpeed flattened
    them and dropped the empty ones). A collective: every rank calls it.
    """
    import torch
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = zero_optimizer.optimizer
    flats = [f for f in _flat_partitions(zero_optimizer) if f.numel()]
    started = bool(flats) and all(inner.state.get(f) for f in flats)
    keys = sorted(k for k, v in inner.state[flats[0]].items() if torch.is_tensor(v) and v.shape == flats[0].shape) \
        if started else []
    step = _step(inner, flats) if started else None
    if started:
        _link_state_slices(zero_optimizer)
    state, param_groups, index = {}, [], 0
    for group, params in zip(_inner_groups(inner, groups), groups):
        group = group or inner.param_groups[0]  # an empty group's hyperparameters are never used
        hyper = {k: v for k, v in group.items() if k != "params" and not k.startswith("_ds")}
        ids = list(range(index, index + len(params)))
        param_groups.append({**hyper, "params": ids})
        for i, param in zip(ids, params):
            if not started:
                continue
            entry = {k: safe_get_full_optimizer_state(param, k).detach().to("cpu", torch.float32).reshape(
                param.ds_shape if hasattr(param, "ds_id") else param.shape).clone() for k in keys}
            entry["step"] = step.clone()
            state[i] = entry
        index += len(params)
    return {"state": state, "param_groups": param_groups}


def scheduler_state_for_all_groups(state: dict, groups: list) -> dict:
    """A scheduler's state over DeepSpeed's param groups (the non-empty ones) -> over all of ``groups``, as in a plain
    torch run. Per-group lists (``base_lrs``, ``_last_lr``, ``lr_lambdas``) get an entry for each empty group."""
    nonempty = [i for i, g in enumerate(groups) if g]
    if len(nonempty) == len(groups):
        return state
    out = dict(state)
    for key, value in state.items():
        if isinstance(value, list) and value and len(value) == len(nonempty):
            full = [value[0]] * len(groups)
            for j, i in enumerate(nonempty):
                full[i] = value[j]
            out[key] = full
    return out


def scheduler_state_for_deepspeed(state: dict, groups: list) -> dict:
    """The inverse of :func:`scheduler_state_for_all_groups`: keep the entries of the non-empty groups."""
    nonempty = [i for i, g in enumerate(groups) if g]
    if len(nonempty) == len(groups):
        return state
    return {k: [v[i] for i in nonempty] if isinstance(v, list) and len(v) == len(groups) else v
            for k, v in state.items()}


def _link_state_slices(zero_optimizer) -> None:
    """ZeRO-1/2 (and the bf16 optimizer): point every parameter's fragment at its slice of the optimizer state.

    DeepSpeed links them once, right after stepping the first param group, so the parameters of later groups (here
    the no-weight-decay biases of the projection) keep an empty link; redo it now that every state exists.
    """
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def _step(inner, flats):
    import torch

    value = inner.state[flats[0]].get("step", inner.param_groups[0].get("step", 0))
    return torch.as_tensor(value, dtype=torch.float32).detach().cpu()


def load_zero_optimizer_state(zero_optimizer, groups: list[list[torch.nn.Parameter]], saved: dict) -> None:
    """Scatter a plain ``torch.optim`` state dict (see :func:`zero_optimizer_state_dict`) into a ZeRO optimizer."""
    import torch

    inner = zero_optimizer.optimizer
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(g) for g in groups]:
        raise ValueError(f"optimizer state has parameter groups of sizes {sizes}, this run {[len(g) for g in groups]}")
    for group, saved_group in zip(_inner_groups(inner, groups), saved["param_groups"]):
        if group is not None:
            group.update({k: v for k, v in saved_group.items() if k != "params"})
    entries = [saved["state"].get(i) for g in saved["param_groups"] for i in g["params"]]
    present = [e for e in entries if e]
    if not present:
        return
    keys = sorted(k for k, v in present[0].items() if torch.is_tensor(v) and v.dim() > 0)
    step = torch.as_tensor(present[0].get("step", 0), dtype=torch.float32)
    # torch optimizers create their state on the first step; create it now so there is somewhere to load into.
    for flat in _flat_partitions(zero_optimizer):
        slot = inner.state[flat]
        for key in keys:
            if key not in slot:
                slot[key] = torch.zeros_like(flat)
        on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
        slot["step"] = step.clone().to(flat.device if on_device else "cpu")
    _link_state_slices(zero_optimizer)
    for param, entry in zip([p for g in groups for p in g], entries):
        if not entry:
            continue
        for key in keys:
            _set_full(param, entry[key], key)
