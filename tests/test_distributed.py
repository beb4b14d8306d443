"""Multi-process training on CPU (gloo): DDP, DeepSpeed ZeRO-2/3 (+offload), prefix-only checkpoints, resume across
world sizes and ZeRO stages, scripts/train.sh and ds_configs/.

One module-scoped fixture launches every configuration once (2 processes each, a tiny Llama) and the tests read
what the launches left behind. All runs see the same global batch of 4 rows per step (2 per process, or 2 x 2
gradient-accumulation steps in one process), the same seed and the same data order, so their loss curves and
prefixes must agree with the single-process run to float rounding.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import save_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_AT = 6, 3
PROMPTS = ["hi", "what", "tell me", "a b c", "xyz", "hello there", "why?", "ok go"]
# Files a checkpoint may hold: the prefix, world-size-independent optimizer/scheduler state, Trainer bookkeeping.
CHECKPOINT_FILES = {"prefix_config.json", "prefix_model.safetensors", "prefix_encoder.safetensors", "optimizer.pt",
                    "scheduler.pt", "trainer_state.json"}
LAUNCH_TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


class Launch:
    def __init__(self, name, out, proc, seconds):
        self.name, self.out, self.seconds = name, out, seconds
        self.returncode, self.log = proc.returncode, proc.stdout + proc.stderr

    def check(self):
        assert self.returncode == 0, f"{self.name} exited {self.returncode}:\n{self.log[-4000:]}"
        return self


def launch(name, out, cmd, environ=None, timeout=LAUNCH_TIMEOUT) -> Launch:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environ or env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(cmd, -9, "", f"timed out after {timeout}s")
    return Launch(name, out, proc, time.perf_counter() - start)


@pytest.fixture(scope="module")
def extensions(tmp_path_factory):
    """DeepSpeed's JIT-compiled ops would land here (a fresh dir: a compile from an earlier run cannot hide)."""
    return tmp_path_factory.mktemp("torch_extensions")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, extensions):
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_checkpoint(root / "model")
    base_env = env(TORCH_EXTENSIONS_DIR=str(extensions))
    with open(root / "train.jsonl", "w") as f:
        for p in PROMPTS:
            f.write(json.dumps({"prompt": p, "response": f"OK: {p}"}) + "\n")
    with open(root / "test.jsonl", "w") as f:
        for p in ["new one", "hi"]:
            f.write(json.dumps({"prompt": p, "response": "OK"}) + "\n")
    zero3 = json.load(open(os.path.join(ROOT, "ds_configs", "zero3.json")))
    offload = json.load(open(os.path.join(ROOT, "ds_configs", "zero3_offload.json")))
    for name, config in (("zero3.json", zero3), ("zero3_offload.json", offload)):
        # "auto" keeps parameters below 10 x hidden_size whole; 0 partitions even this tiny prefix
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        with open(root / name, "w") as f:
            json.dump(config, f)

    # Flags of every run (train.sh sets the same through its variables).
    train = ["--model_name_or_path", model, "--do_train", "--train_file", str(root / "train.jsonl"),
             "--report_to", "none", "--use_cpu", "--seed", "0", "--pre_seq_len", "4", "--learning_rate", "1e-2",
             "--max_steps", str(STEPS), "--max_source_length", "64", "--max_target_length", "32"]
    extra = ["--prefix_projection", "--prefix_hidden_size", "16", "--logging_steps", "1", "--save_steps",
             str(SAVE_AT), "--seed", "0"]
    one = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    two = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]

    def python(name, *args, resume_from=None):
        out = root / name
        if resume_from:
            out.mkdir()
            shutil.copytree(resume_from.out / f"checkpoint-{SAVE_AT}", out / f"checkpoint-{SAVE_AT}")
            args += ("--resume_from_checkpoint", str(out / f"checkpoint-{SAVE_AT}"))
        return launch(name, out, [sys.executable, "main.py", *train, *extra, *one, "--output_dir", str(out), *args],
                      base_env)

    def torchrun(name, *args, resume_from=None, script="main.py", **faults):
        out = root / name
        if resume_from:
            out.mkdir()
            shutil.copytree(resume_from.out / f"checkpoint-{SAVE_AT}", out / f"checkpoint-{SAVE_AT}")
            args += ("--resume_from_checkpoint", str(out / f"checkpoint-{SAVE_AT}"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), script, *train, *extra, *two, "--output_dir", str(out), *args]
        faults = {f"CRASH_{k.upper()}": str(v) for k, v in faults.items()}
        return launch(name, out, cmd, {**base_env, **faults})

    def train_sh(name, **variables):
        out = root / name
        values = dict(MODEL=model, TRAIN_FILE=str(root / "train.jsonl"), TEST_FILE=str(root / "test.jsonl"),
                      OUTPUT_DIR=str(out), PRE_SEQ_LEN="4", LR="1e-2", MAX_STEPS=str(STEPS), BATCH_SIZE="2",
                      GRAD_ACCUM="1", MAX_SOURCE_LENGTH="64", MAX_TARGET_LENGTH="32", PRECISION="fp32",
                      NUM_GPUS="2", MASTER_PORT=str(free_port()), **variables)
        return launch(name, out, ["bash", "scripts/train.sh", *extra, "--max_new_tokens", "4"], {**base_env, **values})

    started = time.perf_counter()
    r = {}
    r["single"] = python("single")
    r["ddp"] = train_sh("ddp", PREDICT="0")  # torchrun through scripts/train.sh
    r["zero2"] = train_sh("zero2", LAUNCHER="deepspeed", DS_CONFIG="ds_configs/zero2.json")  # + predict step
    r["zero3"] = torchrun("zero3", "--deepspeed", str(root / "zero3.json"))
    r["zero2_to_1"] = python("zero2_to_1", resume_from=r["zero2"])
    r["1_to_zero2"] = torchrun("1_to_zero2", "--deepspeed", "ds_configs/zero2.json", resume_from=r["single"])
    # every rank SIGKILLed right after step SAVE_AT + 1, then resumed from the newest complete checkpoint
    r["zero2_killed"] = torchrun("zero2_crash", "--deepspeed", "ds_configs/zero2.json", script="tests/crash_run.py",
                                 kill_after_step=SAVE_AT + 1)
    r["zero2_crash_resumed"] = torchrun("zero2_crash", "--deepspeed", "ds_configs/zero2.json",
                                        "--resume_from_checkpoint", "latest")
    # SIGTERM reaches rank 1 alone: both ranks must save the same step and stop
    r["zero2_sigterm"] = torchrun("zero2_sigterm", "--deepspeed", "ds_configs/zero2.json", "--enable_jit_checkpoint",
                                  "--max_steps", "100000", "--save_steps", "100000", script="tests/crash_run.py",
                                  sigterm_after_step=2, only_rank=1)
    r["zero3_to_offload"] = torchrun("zero3_to_offload", "--deepspeed", str(root / "zero3_offload.json"),
                                     resume_from=r["zero3"])
    timings = {name: round(run.seconds, 1) for name, run in r.items()}
    timings["all"] = round(time.perf_counter() - started, 1)
    print(f"\nlaunch seconds: {timings}")
    return r


def losses(run, after=0):
    state = json.loads((run.out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h and h["step"] > after}


def prefix(run):
    return {**load_file(str(run.out / "prefix_model.safetensors")),
            **load_file(str(run.out / "prefix_encoder.safetensors"))}


def assert_same_prefix(run, ref, atol=1e-5):
    got, want = prefix(run), prefix(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=atol, rtol=0), (run.name, k, (got[k] - want[k]).abs().max())


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_two_processes_match_the_single_process_loss_curve(runs, name):
    single, run = runs["single"].check(), runs[name].check()
    ref, got = losses(single), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(ref)
    assert max(abs(got[s] - ref[s]) for s in ref) <= 1e-4, (got, ref)
    assert_same_prefix(run, single)  # DDP, ZeRO-2 and ZeRO-3 export the prefix the single process trained


@pytest.mark.parametrize("name", ["single", "ddp", "zero2", "zero3", "zero2_to_1", "1_to_zero2", "zero3_to_offload"])
def test_checkpoints_hold_only_the_prefix_and_its_tiny_state(runs, name):
    run = runs[name].check()
    assert {"prefix_config.json", "prefix_model.safetensors", "prefix_encoder.safetensors"} <= set(
        os.listdir(run.out))
    for step in (SAVE_AT, STEPS):
        ckpt = run.out / f"checkpoint-{step}"
        names = set(os.listdir(ckpt))
        rng = {n for n in names if n.startswith("rng_state")}
        assert names - rng == CHECKPOINT_FILES, names  # no global_step*/, zero_to_fp32.py, model weights
        assert sum(os.path.getsize(ckpt / n) for n in names) < 200_000
    leftovers = [p for p in run.out.rglob("*") if p.name.startswith(".prefix-") or p.name.endswith(".tmp")]
    assert not leftovers


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "1_to_zero2", "zero3_to_offload"])
def test_logged_once_and_clean_exit(runs, name):
    run = runs[name].check()
    steps = STEPS if run.name in ("ddp", "zero2", "zero3") else STEPS - SAVE_AT
    assert run.log.count("{'loss': ") == steps  # rank 0 only
    assert run.log.count("trainable params:") == 1
    assert run.log.count("***** train metrics *****") == 1
    assert "SIGABRT" not in run.log and "terminate called" not in run.log
    assert "built successfully" not in run.log


def test_no_deepspeed_op_is_compiled(runs, extensions):
    """On CPU DeepSpeed would JIT-compile a shared-memory comm op and, under offload, its CPU Adam (a minute each)."""
    assert all(run.returncode == 0 for name, run in runs.items() if name not in ("zero2_killed", "zero2_sigterm"))
    assert not list(extensions.iterdir())


def test_zero_optimizer_state_is_saved_whole_like_a_single_process(runs):
    """ZeRO-2/3 write what a single-process torch AdamW writes, so any world size or stage can resume from it."""
    ref = torch.load(runs["single"].check().out / f"checkpoint-{SAVE_AT}" / "optimizer.pt", weights_only=True)
    for name in ("zero2", "zero3"):
        got = torch.load(runs[name].check().out / f"checkpoint-{SAVE_AT}" / "optimizer.pt", weights_only=True)
        assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in ref["param_groups"]]
        assert [g["lr"] for g in got["param_groups"]] == pytest.approx([g["lr"] for g in ref["param_groups"]])
        assert got["state"].keys() == ref["state"].keys() and len(ref["state"]) == 5  # 4 projection + embedding
        for i, want in ref["state"].items():
            assert int(got["state"][i]["step"]) == int(want["step"]) == SAVE_AT
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.allclose(got["state"][i][key], want[key], rtol=1e-4, atol=1e-8), (name, i, key)


@pytest.mark.parametrize("name,source", [("zero2_to_1", "zero2"), ("1_to_zero2", "single"),
                                         ("zero3_to_offload", "zero3")])
def test_resume_under_another_world_size_or_stage_ends_like_an_uninterrupted_run(runs, name, source):
    run, single = runs[name].check(), runs["single"].check()
    runs[source].check()
    state = json.loads((run.out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    got, ref = losses(run, after=SAVE_AT), losses(single, after=SAVE_AT)
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    assert max(abs(got[s] - ref[s]) for s in got) <= 1e-4, (got, ref)
    assert_same_prefix(run, single)


def test_zero2_run_killed_on_both_ranks_resumes_bit_identically(runs):
    killed, resumed, uninterrupted = runs["zero2_killed"], runs["zero2_crash_resumed"].check(), runs["zero2"].check()
    assert killed.returncode != 0 and "exitcode: -9" in killed.log, killed.log[-3000:]
    assert resumed.log.count("{'loss': ") == STEPS - SAVE_AT  # went on from checkpoint-SAVE_AT, not from scratch
    got, want = prefix(resumed), prefix(uninterrupted)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert losses(resumed, after=SAVE_AT) == losses(uninterrupted, after=SAVE_AT)


def test_sigterm_on_one_rank_stops_both_at_the_same_step_with_a_complete_checkpoint(runs):
    run = runs["zero2_sigterm"]
    assert run.returncode != 0 and "exitcode: 143" in run.log, run.log[-3000:]
    names = [n for n in os.listdir(run.out) if not n.startswith(".")]
    assert len(names) == 1 and names[0].startswith("checkpoint-"), names
    files = set(os.listdir(run.out / names[0]))
    assert CHECKPOINT_FILES | {"rng_state_0.pth", "rng_state_1.pth"} == files
    assert run.log.count(f"error: SIGTERM: saved {names[0]} in {run.out} and stopped") == 2  # rank 0 too


def test_train_sh_predicts_once_from_the_exported_prefix(runs):
    run = runs["zero2"].check()
    rows = [json.loads(line) for line in (run.out / "generated_predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["new one", "hi"]
    assert run.log.count("predictions written to") == 1
    assert not (runs["ddp"].out / "generated_predictions.jsonl").exists()  # PREDICT=0


def dry_run(**variables):
    proc = subprocess.run(["bash", "scripts/train.sh"], capture_output=True, text=True, cwd=ROOT,
                          env=env(DRY_RUN="1", **variables), timeout=120)
    return proc.returncode, proc.stdout.strip().splitlines(), proc.stderr


def test_train_sh_commands():
    rc, lines, _ = dry_run()  # the no-argument demo stays one process that trains, previews and predicts
    assert rc == 0 and len(lines) == 1 and lines[0].startswith("python main.py ")
    assert "--do_predict" in lines[0] and "--preview_samples 3" in lines[0] and "--deepspeed" not in lines[0]

    rc, lines, _ = dry_run(NUM_GPUS="8", NNODES="2", NODE_RANK="0", MASTER_ADDR="10.0.0.1", MASTER_PORT="6000",
                           DS_CONFIG="ds_configs/zero3.json", MODEL="m", PRE_SEQ_LEN="128", LR="3e-2",
                           QUANT_BIT="8")
    assert rc == 0 and len(lines) == 2
    assert lines[0].startswith("torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 "
                               "--master_port 6000 main.py ")
    for flag in ("--deepspeed ds_configs/zero3.json", "--pre_seq_len 128", "--learning_rate 3e-2",
                 "--quantization_bit 8"):
        assert flag in lines[0]
    assert "--do_predict" not in lines[0]
    assert lines[1].startswith("python main.py ") and "--ptuning_checkpoint output/demo --do_predict" in lines[1]

    rc, lines, _ = dry_run(NNODES="2", NODE_RANK="1", MODEL="m")  # only node 0 predicts
    assert rc == 0 and len(lines) == 1 and "--node_rank 1" in lines[0]

    rc, lines, _ = dry_run(HOSTFILE="hosts", DS_CONFIG="ds_configs/zero2.json", MODEL="m")
    assert rc == 0 and lines[0].startswith("deepspeed --no_local_rank ") and "--hostfile hosts" in lines[0]

    if not torch.cuda.is_available():
        rc, _, err = dry_run(PRECISION="fp16", MODEL="m")
        assert rc == 2 and "fp16 needs a GPU" in err


CONFIG_CHECK = r"""
import json, sys
sys.path.insert(0, "tests")
from deepspeed.runtime.config import DeepSpeedConfig
from transformers import TrainingArguments
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
from tiny_models import tiny_model

model = tiny_model()
for path in sys.argv[1:]:
    raw = json.load(open(path))
    for bf16 in (False, True):
        args = TrainingArguments(output_dir="/tmp/unused", deepspeed=path, use_cpu=True, bf16=bf16, report_to="none",
                                 per_device_train_batch_size=3, gradient_accumulation_steps=2, max_grad_norm=0.5)
        config = HfTrainerDeepSpeedConfig(path)
        config.trainer_config_process(args)
        config.trainer_config_finalize(args, model, num_training_steps=10)
        filled = config.config
        assert "auto" not in json.dumps(filled), (path, filled)
        assert filled["bf16"]["enabled"] is bf16 and filled["fp16"]["enabled"] is False, filled
        assert filled["train_micro_batch_size_per_gpu"] == 3 and filled["gradient_accumulation_steps"] == 2
        assert filled["gradient_clipping"] == 0.5
        DeepSpeedConfig(filled)  # DeepSpeed's own validation
    args.fp16, args.bf16 = True, False
    config = HfTrainerDeepSpeedConfig(path)
    config.trainer_config_process(args)
    assert config.config["fp16"]["enabled"] is True and config.config["bf16"]["enabled"] is False
    print(path, "stage", raw["zero_optimization"]["stage"], "ok")
"""


def test_every_ds_config_parses_fills_its_autos_and_is_accepted_by_deepspeed():
    paths = sorted(os.path.join("ds_configs", n) for n in os.listdir(os.path.join(ROOT, "ds_configs")))
    assert {"ds_configs/zero2.json", "ds_configs/zero3.json", "ds_configs/zero3_offload.json"} <= set(paths)
    for p in paths:
        json.load(open(os.path.join(ROOT, p)))
    offload = json.load(open(os.path.join(ROOT, "ds_configs", "zero3_offload.json")))
    zero = offload["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    # keep the Trainer's torch AdamW on the offloaded prefix: accelerate would swap in DeepSpeedCPUAdam, a JIT-built
    # op (minutes on a fresh machine, a compiler needed) for a few megabytes of trainable state
    assert offload["zero_force_ds_cpu_optimizer"] is False
    # In a child: TrainingArguments(deepspeed=...) switches transformers into ZeRO-3 loading for the whole process.
    proc = subprocess.run([sys.executable, "-c", CONFIG_CHECK, *paths], capture_output=True, text=True, cwd=ROOT,
                          env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == len(paths)


ZERO_STATE_CHECK = r"""
import sys
import torch
import deepspeed

sys.path.insert(0, ".")
from ptuning import distributed as D

D.prepare(["--deepspeed", "unused", "--use_cpu"])  # CPU: no JIT op, DeepSpeed's comm up
rank = torch.distributed.get_rank()


def model_and_groups(layout):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    weights, biases = [m[0].weight, m[2].weight], [m[0].bias, m[2].bias]
    # "two": two non-empty groups (the prefix projection); "empty": the second group empty (no projection)
    return m, ([weights, biases] if layout == "two" else [weights + biases, []])


def optimizer(groups):
    return torch.optim.AdamW([{"params": g, "weight_decay": 0.1 - 0.1 * i} for i, g in enumerate(groups)], lr=0.05)


def loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


g = torch.Generator().manual_seed(1)
data = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(4)]  # same on every rank


def close(got, want, what):
    assert got.keys() == want.keys(), (what, got.keys(), want.keys())
    for k in want:
        assert torch.allclose(got[k].float(), want[k].float(), rtol=1e-5, atol=1e-7), (what, k, got[k], want[k])


for stage, offload in ((2, False), (3, False), (3, True)):
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
    if offload:
        zero.update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    config = {"train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True, "zero_optimization": zero,
              "gradient_clipping": 0.0,  # the torch reference does not clip
              "zero_force_ds_cpu_optimizer": False}  # keep torch's AdamW under offload, as ds_configs/ do
    for layout in ("two", "empty"):
        what = f"stage {stage} offload {offload} {layout}"
        ref, ref_groups = model_and_groups(layout)
        ref_opt = optimizer(ref_groups)
        for x, y in data[:2]:
            ref_opt.zero_grad()
            loss(ref, x, y).backward()
            ref_opt.step()
        # a fresh engine resumes from the plain torch state (weights, Adam moments, step) ...
        model, groups = model_and_groups(layout)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(groups), config=config)
        D.load_trainable_state(model, ref.state_dict())
        D.load_zero_optimizer_state(engine.optimizer, groups, ref_opt.state_dict())
        # ... follows the torch run step for step on 2 ranks ...
        for x, y in data[2:]:
            ref_opt.zero_grad()
            loss(ref, x, y).backward()
            ref_opt.step()
            engine.backward(loss(engine, x, y))
            engine.step()
        close(D.trainable_state(model), ref.state_dict(), what)
        # ... and its gathered state is the plain torch state, in the plain torch layout
        saved, want = D.zero_optimizer_state_dict(engine.optimizer, groups), ref_opt.state_dict()
        assert [g["params"] for g in saved["param_groups"]] == [g["params"] for g in want["param_groups"]], what
        assert saved["param_groups"][0]["weight_decay"] == 0.1, what
        assert saved["state"].keys() == want["state"].keys(), what
        for i in want["state"]:
            close(saved["state"][i], want["state"][i], what)
        engine.destroy()
        if rank == 0:
            print(what, "ok", flush=True)
D.shutdown()
"""


def test_zero_state_round_trips_through_the_plain_torch_layout(tmp_path, extensions):
    """ZeRO-2/3/offload on 2 ranks, with two param groups or an empty one (DeepSpeed drops it, torch keeps it)."""
    script = tmp_path / "zero_state_check.py"
    script.write_text(ZERO_STATE_CHECK)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], capture_output=True, text=True, cwd=ROOT,
                          env=env(TORCH_EXTENSIONS_DIR=str(extensions)), timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count(" ok") == 6, proc.stdout
    assert not list(extensions.iterdir())


def test_scheduler_state_layout_matches_a_plain_torch_run():
    import functools

    from ptuning.distributed import scheduler_state_for_all_groups, scheduler_state_for_deepspeed

    p = torch.nn.Parameter(torch.zeros(2))
    groups = [[p], []]
    lam = functools.partial(lambda step, total: 1 - step / total, total=10)
    plain = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([{"params": [p]}, {"params": []}], lr=0.1),
                                              [lam, lam])
    ds = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([p], lr=0.1), lam)  # DeepSpeed dropped the empty group
    for _ in range(3):
        plain.optimizer.step()
        plain.step()
        ds.optimizer.step()
        ds.step()
    assert scheduler_state_for_all_groups(ds.state_dict(), groups) == plain.state_dict()
    fresh = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([p], lr=0.1), lam)
    fresh.load_state_dict(scheduler_state_for_deepspeed(plain.state_dict(), groups))
    assert fresh.state_dict() == ds.state_dict()
    assert scheduler_state_for_deepspeed(ds.state_dict(), [[p]]) == ds.state_dict()  # nothing to do
