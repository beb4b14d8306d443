"""main.py end to end on families outside the first seven: Gemma 2 (sliding window, soft-capping), Phi-3 and a
DeepSeek-V3 model (multi-head latent attention, MoE): train, export, reload from the export, generate."""

import json

import pytest

import main
from families import family_model
from ptuning.prefix import CONFIG_NAME
from tiny_models import CHATML, make_tokenizer

ANSWER = "OK: yes"
PROMPTS = ["hi", "what", "tell me", "a b c", "xyz", "hello there", "why?", "ok go"]


def save_family_checkpoint(path, name):
    """Weights larger than the default init let a prefix move the logits far enough to learn a fixed reply; Gemma 2's
    window is widened past the ~40-token rows (real ones are 4096), else its sliding layers mask the prefix out of
    the reply's positions (see docs/models.md) and only the global layers would carry it there."""
    tokenizer = make_tokenizer(CHATML)
    extra = dict(sliding_window=128) if name == "gemma2" else {}
    model = family_model(name, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, initializer_range=0.2, **extra)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("name", ["gemma2", "phi3", "deepseek_v3"])
def test_main_trains_exports_reloads_and_generates(name, tmp_path, capsys):
    model_dir = save_family_checkpoint(tmp_path / "model", name)
    with open(tmp_path / "train.jsonl", "w") as f:
        for p in PROMPTS:
            f.write(json.dumps({"prompt": p, "response": ANSWER}) + "\n")
    with open(tmp_path / "test.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "new one", "response": ANSWER}) + "\n")
    out = tmp_path / "run"
    common = ["--model_name_or_path", model_dir, "--report_to", "none", "--max_new_tokens", "8", "--use_cpu",
              "--seed", "0"]
    assert main.main(common + [
        "--output_dir", str(out), "--do_train", "--train_file", str(tmp_path / "train.jsonl"), "--do_predict",
        "--test_file", str(tmp_path / "test.jsonl"), "--pre_seq_len", "8", "--learning_rate", "5e-2",
        "--max_steps", "80", "--per_device_train_batch_size", "4", "--logging_steps", "5", "--save_steps", "80",
        "--prefix_projection", "--prefix_hidden_size", "32",
        "--gradient_checkpointing"]) == 0
    state = json.loads((out / "checkpoint-80" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < losses[0] / 3
    saved = json.loads((out / CONFIG_NAME).read_text())
    assert saved["format_version"] == 2 and saved["base_architecture"] == family_model(name).config.architectures[0]
    predicted = json.loads((out / "generated_predictions.jsonl").read_text())["prediction"]
    assert predicted.startswith("O")  # the reply's first token is learned (the base never says it: checked below)

    capsys.readouterr()
    assert main.main(["--model_name_or_path", model_dir, "--ptuning_checkpoint", str(out), "--prompt", "new one",
                      "--max_new_tokens", "8"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == predicted  # the export reloads to the same text
    assert main.main(["--model_name_or_path", model_dir, "--prompt", "new one", "--max_new_tokens", "8"]) == 0
    assert not capsys.readouterr().out.strip().splitlines()[-1].startswith("O")
