"""training_loss.png after training, and TensorBoard chosen by default only when it is installed."""

import json

from PIL import Image

import main
from ptuning.args import parse_args
from ptuning.plots import plot_training, save_training_plot
from tiny_models import save_tiny_checkpoint


def assert_png(path, min_size=(300, 200)):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]


def test_plot_of_loss_learning_rate_and_eval_metrics(tmp_path):
    history = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-2 * (1 - s / 10), "epoch": s / 10} for s in
               range(1, 10)]
    history += [{"step": 5, "eval_loss": 1.0, "eval_bleu-4": 12.5, "eval_runtime": 0.1},
                {"step": 9, "eval_loss": 0.5, "eval_bleu-4": 30.0, "eval_runtime": 0.1},
                {"step": 9, "train_loss": 1.2, "train_runtime": 3.0}]
    path = plot_training(history, str(tmp_path / "plots" / "training_loss.png"))
    assert_png(path, (700, 600))  # two panels: loss + lr, and the evaluation metrics
    only_loss = plot_training(history[:9], str(tmp_path / "loss.png"))
    assert_png(only_loss)
    assert Image.open(only_loss).size[1] < Image.open(path).size[1]


def test_nothing_logged_means_no_plot_and_errors_are_only_warnings(tmp_path, caplog):
    assert plot_training([{"train_runtime": 1.0}], str(tmp_path / "x.png")) is None
    assert not (tmp_path / "x.png").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert save_training_plot([{"step": 1, "loss": 1.0}], str(blocker)) is None
    assert "could not write" in caplog.text


def test_a_short_run_writes_a_valid_training_loss_png(tmp_path):
    model_dir = save_tiny_checkpoint(tmp_path / "model")
    with open(tmp_path / "train.jsonl", "w") as f:
        for p in ["hi", "what", "tell me", "ok go"]:
            f.write(json.dumps({"prompt": p, "response": "yes"}) + "\n")
    out = tmp_path / "run"
    argv = ["--model_name_or_path", model_dir, "--output_dir", str(out), "--report_to", "none", "--use_cpu",
            "--do_train", "--train_file", str(tmp_path / "train.jsonl"), "--do_eval", "--validation_file",
            str(tmp_path / "train.jsonl"), "--eval_strategy", "steps", "--eval_steps", "2", "--pre_seq_len", "4",
            "--max_steps", "4", "--logging_steps", "1", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-2", "--save_strategy", "no"]
    assert main.main(argv) == 0
    assert_png(out / "training_loss.png")


def test_tensorboard_is_the_default_only_when_installed(monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_tensorboard_available", lambda: False)
    assert parse_args([])[3].report_to == []
    monkeypatch.setattr(transformers.integrations, "is_tensorboard_available", lambda: True)
    assert parse_args([])[3].report_to == ["tensorboard"]
    assert parse_args(["--report_to", "none"])[3].report_to == []
