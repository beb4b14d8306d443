"""Flags, paths and configs are refused before any weights load, one line each."""

import json

import pytest

from ptuning.args import parse_args
from ptuning.errors import UserError
from ptuning.export import save_prefix
from ptuning.model import attach_prefix
from ptuning.validate import validate_run
from tiny_models import save_tiny_checkpoint, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("m") / "model")


def check(argv):
    return validate_run(*parse_args(argv))


def base(model_dir, tmp_path, *extra):
    return ["--model_name_or_path", model_dir, "--output_dir", str(tmp_path / "out"), "--max_source_length", "64",
            "--max_target_length", "32", *extra]


def test_valid_run_returns_the_base_config(model_dir, tmp_path):
    config = check(base(model_dir, tmp_path, "--do_train", "--train_file", "t.jsonl", "--max_steps", "3"))
    assert config.num_hidden_layers == 2


@pytest.mark.parametrize("extra,message", [
    (["--pre_seq_len", "0"], "--pre_seq_len: expected a value >= 1, got 0"),
    (["--prefix_hidden_size", "0"], "--prefix_hidden_size: expected a value >= 1"),
    (["--prefix_dropout", "1.5"], "--prefix_dropout: expected a value in [0, 1)"),
    (["--max_source_length", "0"], "--max_source_length: expected a value >= 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens: expected a value >= 1"),
    (["--quantization_bit", "3"], "--quantization_bit: expected 4 or 8, got 3"),
    (["--quant_type", "int4"], "--quant_type: expected one of nf4, fp4"),
    (["--double_quant"], "--double_quant: only applies to --quantization_bit 4"),
    (["--do_train", "--train_file", "t.jsonl", "--learning_rate", "0"], "--learning_rate: expected a positive value"),
    (["--do_train"], "--do_train needs --train_file"),
    (["--do_predict"], "--do_predict needs --test_file"),
    (["--fp16", "--use_cpu"], "--fp16: needs a CUDA GPU"),
    (["--pre_seq_len", "1000", "--max_source_length", "50", "--max_target_length", "10"],
     "exceeds the model's max_position_embeddings (1024)"),
])
def test_bad_flags(model_dir, tmp_path, extra, message):
    with pytest.raises(UserError) as e:
        check(base(model_dir, tmp_path, *extra))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_deepspeed_config_checks(model_dir, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{ nope")
    with pytest.raises(UserError, match="not valid JSON"):
        check(base(model_dir, tmp_path, "--deepspeed", str(broken)))
    with pytest.raises(UserError, match="no such file"):
        check(base(model_dir, tmp_path, "--deepspeed", str(tmp_path / "none.json")))
    zero3 = tmp_path / "z3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(UserError, match="cannot be combined with DeepSpeed ZeRO-3"):
        check(base(model_dir, tmp_path, "--deepspeed", str(zero3), "--quantization_bit", "4"))
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 7}))
    with pytest.raises(UserError, match="train_batch_size is 7 but .* = 8"):
        check(base(model_dir, tmp_path, "--deepspeed", str(fixed), "--per_device_train_batch_size", "8"))


def test_model_path_checks(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        check(["--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        check(["--model_name_or_path", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")])


def test_checkpoint_mismatch_is_found_before_loading_weights(model_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    save_prefix(attach_prefix(tiny_model("llama", num_hidden_layers=3), 4), str(ckpt))
    with pytest.raises(UserError, match="num_layers is 3 but the base model has 2"):
        check(base(model_dir, tmp_path, "--ptuning_checkpoint", str(ckpt)))
    (ckpt / "prefix_model.safetensors").unlink()
    with pytest.raises(UserError, match="prefix_model.safetensors is missing"):
        check(base(model_dir, tmp_path, "--ptuning_checkpoint", str(ckpt)))


def test_output_dir_that_is_a_file(model_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        check(["--model_name_or_path", model_dir, "--output_dir", str(tmp_path / "file")])


def test_fp16_warns_where_bf16_is_the_safe_choice(monkeypatch):
    from types import SimpleNamespace

    import torch

    from ptuning.validate import precision_warnings

    model_args = SimpleNamespace(torch_dtype="auto", model_name_or_path="THUDM/glm-4-9b")
    fp16, fp32 = SimpleNamespace(fp16=True), SimpleNamespace(fp16=False)
    bf16_model, fp16_model = SimpleNamespace(dtype="bfloat16"), SimpleNamespace(dtype="float16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision_warnings(model_args, fp32, bf16_model, True) == []
    gpu, model = precision_warnings(model_args, fp16, bf16_model, True)
    assert gpu.startswith("--fp16: this GPU supports bf16") and "prefer --bf16" in gpu
    assert model.startswith("--fp16: THUDM/glm-4-9b was trained in bfloat16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a V100 or T4: fp16 is the only way
    assert precision_warnings(model_args, fp16, fp16_model, True) == []
    assert len(precision_warnings(model_args, fp16, bf16_model, True)) == 1


def test_position_budget_uses_the_loaded_prefix_length(model_dir, tmp_path):
    """--ptuning_checkpoint brings its own pre_seq_len; the flag's default (16) would hide an over-long prefix."""
    from ptuning.export import save_prefix
    from ptuning.model import attach_prefix

    ckpt = tmp_path / "long_prefix"
    save_prefix(attach_prefix(tiny_model("llama"), 1000), str(ckpt))
    argv = base(model_dir, tmp_path, "--ptuning_checkpoint", str(ckpt), "--do_predict", "--test_file", "t.jsonl",
                "--max_source_length", "50", "--max_target_length", "10")
    with pytest.raises(UserError, match="= 1060 exceeds the model's max_position_embeddings"):
        check(argv)
