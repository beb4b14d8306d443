"""DeepSpeed ZeRO-3 on two CPU processes with an MoE family (Qwen3-MoE, 4 experts, 2 per token): the loss curve and
the exported prefix equal a single process's with the same global batch (launch helpers: tests/test_distributed.py)."""

import json
import sys

import torch
from safetensors.torch import load_file

from families import family_model
from test_distributed import ROOT, env, free_port, launch
from tiny_models import CHATML, make_tokenizer

STEPS = 3


def test_zero3_on_an_moe_family_matches_one_process(tmp_path):
    tokenizer = make_tokenizer(CHATML)
    model = family_model("qwen3_moe", eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         initializer_range=0.2)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with open(tmp_path / "train.jsonl", "w") as f:
        for p in ["hi", "what", "tell me", "a b c", "xyz", "hello there", "why?", "ok go"]:
            f.write(json.dumps({"prompt": p, "response": f"OK: {p}"}) + "\n")
    zero3 = json.load(open(f"{ROOT}/ds_configs/zero3.json"))
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even these tiny weights
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    train = ["main.py", "--model_name_or_path", str(tmp_path / "model"), "--do_train", "--train_file",
             str(tmp_path / "train.jsonl"), "--report_to", "none", "--use_cpu", "--seed", "0", "--pre_seq_len", "4",
             "--learning_rate", "1e-2", "--max_steps", str(STEPS), "--logging_steps", "1", "--save_steps",
             str(STEPS), "--max_source_length", "32", "--max_target_length", "16"]
    single = launch("single", tmp_path / "single", [sys.executable, *train, "--output_dir", str(tmp_path / "single"),
                                                    "--per_device_train_batch_size", "2",
                                                    "--gradient_accumulation_steps", "2"], env()).check()
    zero = launch("zero3", tmp_path / "zero3", [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        *train, "--output_dir", str(tmp_path / "zero3"), "--per_device_train_batch_size", "2",
        "--deepspeed", str(tmp_path / "zero3.json")], env()).check()

    def losses(run):
        state = json.loads((run.out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
        return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}

    ref, got = losses(single), losses(zero)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - ref[s]) for s in ref) <= 1e-4, (got, ref)
    got, want = (load_file(str(run.out / "prefix_model.safetensors"))["prefix"] for run in (zero, single))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
