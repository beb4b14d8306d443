"""End-to-end: main.py trains a prefix on a tiny local checkpoint, exports it, and generation follows it."""

import json
import os
import subprocess
import sys

import pytest

import main
from ptuning.prefix import CONFIG_NAME
from tiny_models import save_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWER = "OK: yes"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model_dir = save_tiny_checkpoint(root / "model")
    prompts = ["hi", "what", "tell me", "a b c", "xyz", "hello there", "why?", "ok go"]
    with open(root / "train.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p, "response": ANSWER}) + "\n")
    with open(root / "test.jsonl", "w") as f:
        for p in ["new one", "hi"]:
            f.write(json.dumps({"prompt": p, "response": ANSWER}) + "\n")
    return root, model_dir


def common(root, model_dir, out):
    return ["--model_name_or_path", model_dir, "--output_dir", str(out), "--report_to", "none",
            "--max_new_tokens", "8", "--use_cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def trained(workspace):
    root, model_dir = workspace
    out = root / "run"
    argv = common(root, model_dir, out) + [
        "--do_train", "--train_file", str(root / "train.jsonl"), "--do_predict", "--test_file", str(root / "test.jsonl"),
        "--pre_seq_len", "8", "--learning_rate", "5e-2", "--max_steps", "60", "--per_device_train_batch_size", "4",
        "--logging_steps", "5", "--save_steps", "30", "--prefix_projection", "--prefix_hidden_size", "32",
        "--gradient_checkpointing",
    ]
    assert main.main(argv) == 0
    return out


def test_loss_goes_down_and_checkpoints_hold_only_the_prefix(trained):
    state = json.loads((trained / "checkpoint-60" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < losses[0] / 3
    for ckpt in ("checkpoint-30", "checkpoint-60"):
        names = set(os.listdir(trained / ckpt))
        assert {CONFIG_NAME, "prefix_model.safetensors", "prefix_encoder.safetensors"} <= names
        assert not any(n.startswith("model") or n.endswith(".bin") and "training_args" not in n for n in names)
        total = sum(os.path.getsize(trained / ckpt / n) for n in names)
        assert total < 2_000_000


def test_total_flos_counts_a_frozen_base(trained):
    """4 N per token (forward + backward to the inputs; no weight gradients), N the base's non-embedding parameters."""
    from transformers import AutoModelForCausalLM

    state = json.loads((trained / "checkpoint-60" / "trainer_state.json").read_text())
    n = AutoModelForCausalLM.from_pretrained(json.loads((trained / CONFIG_NAME).read_text())[
        "base_model_name_or_path"]).num_parameters(exclude_embeddings=True)
    tokens = state["total_flos"] / (4 * n)
    assert tokens == int(tokens) and 60 * 4 * 3 <= tokens <= 60 * 4 * 64  # 60 steps x 4 rows x their padded length


def test_generation_follows_what_training_taught(trained):
    rows = [json.loads(line) for line in (trained / "generated_predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["new one", "hi"]
    assert all(r["label"] == ANSWER for r in rows)
    assert [r["prediction"] for r in rows] == [ANSWER, ANSWER]


def test_predict_from_exported_prefix_matches_and_is_deterministic(workspace, trained, tmp_path):
    root, model_dir = workspace
    argv = common(root, model_dir, tmp_path) + ["--ptuning_checkpoint", str(trained), "--do_predict", "--test_file",
                                                 str(root / "test.jsonl")]
    assert main.main(argv) == 0
    again = (tmp_path / "generated_predictions.jsonl").read_text()
    assert again == (trained / "generated_predictions.jsonl").read_text()


def test_one_shot_prompt_mode(workspace, trained, capsys):
    root, model_dir = workspace
    argv = ["--model_name_or_path", model_dir, "--ptuning_checkpoint", str(trained), "--prompt", "anything",
            "--max_new_tokens", "8"]
    assert main.main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == ANSWER


def test_resume_from_latest_checkpoint_continues(workspace, trained):
    root, model_dir = workspace
    argv = common(root, model_dir, trained) + [
        "--do_train", "--train_file", str(root / "train.jsonl"), "--pre_seq_len", "8", "--prefix_projection",
        "--prefix_hidden_size", "32", "--max_steps", "65", "--per_device_train_batch_size", "4",
        "--learning_rate", "5e-2", "--resume_from_checkpoint", "latest", "--save_steps", "65",
    ]
    assert main.main(argv) == 0
    state = json.loads((trained / "checkpoint-65" / "trainer_state.json").read_text())
    assert state["global_step"] == 65
    assert [h["step"] for h in state["log_history"] if "loss" in h][0] == 5


def test_existing_run_is_not_overwritten_and_cli_errors_are_one_line(workspace, trained):
    root, model_dir = workspace
    before = sorted(os.listdir(trained))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), *common(root, model_dir, trained), "--do_train",
         "--train_file", str(root / "train.jsonl")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(trained)) == before


def test_bad_row_stops_before_loading_the_model(workspace, tmp_path, capsys, monkeypatch):
    import ptuning

    root, model_dir = workspace
    monkeypatch.setattr(ptuning, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": ""}\n')
    argv = common(root, model_dir, tmp_path / "o") + ["--do_train", "--train_file", str(bad)]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{bad}: row 2: field 'response'" in err
