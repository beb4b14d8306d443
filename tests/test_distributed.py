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
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_checkpoint(root / "model")
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
        return launch(name, out, [sys.executable, "main.py", *train, *extra, *one, "--output_dir", str(out), *args])

    def torchrun(name, *args, resume_from=None):
        out = root / name
        if resume_from:
            out.mkdir()
            shutil.copytree(resume_from.out / f"checkpoint-{SAVE_AT}", out / f"checkpoint-{SAVE_AT}")
            args += ("--resume_from_checkpoint", str(out / f"checkpoint-{SAVE_AT}"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "main.py", *train, *extra, *two, "--output_dir", str(out), *args]
        return launch(name, out, cmd)

    def train_sh(name, **variables):
        out = root / name
        values = dict(MODEL=model, TRAIN_FILE=str(root / "train.jsonl"), TEST_FILE=str(root / "test.jsonl"),
                      OUTPUT_DIR=str(out), PRE_SEQ_LEN="4", LR="1e-2", MAX_STEPS=str(STEPS), BATCH_SIZE="2",
                      GRAD_ACCUM="1", MAX_SOURCE_LENGTH="64", MAX_TARGET_LENGTH="32", PRECISION="fp32",
                      NUM_GPUS="2", MASTER_PORT=str(free_port()), **variables)
        return launch(name, out, ["bash", "scripts/train.sh", *extra, "--max_new_tokens", "4"], env(**values))

    started = time.perf_counter()
    r = {}
    r["single"] = python("single")
    r["ddp"] = train_sh("ddp", PREDICT="0")  # torchrun through scripts/train.sh
    r["zero2"] = train_sh("zero2", LAUNCHER="deepspeed", DS_CONFIG="ds_configs/zero2.json")  # + predict step
    r["zero3"] = torchrun("zero3", "--deepspeed", str(root / "zero3.json"))
    r["zero2_to_1"] = python("zero2_to_1", resume_from=r["zero2"])
    r["1_to_zero2"] = torchrun("1_to_zero2", "--deepspeed", "ds_configs/zero2.json", resume_from=r["single"])
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
    assert "built successfully" not in run.log  # no JIT-compiled DeepSpeed op on CPU


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
    offload = json.load(open(os.path.join(ROOT, "ds_configs", "zero3_offload.json")))["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"
    # In a child: TrainingArguments(deepspeed=...) switches transformers into ZeRO-3 loading for the whole process.
    proc = subprocess.run([sys.executable, "-c", CONFIG_CHECK, *paths], capture_output=True, text=True, cwd=ROOT,
                          env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == len(paths)
