"""ChatGLM P-tuning .bin import and PEFT prefix-tuning export/import give the logits of the source prefix."""

import json
import os
from collections import OrderedDict

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

import main
from ptuning.errors import UserError
from ptuning.export import load_prefix, save_prefix
from ptuning.interop import config_geometry, export_peft, import_chatglm, import_peft, read_tensor_file
from ptuning.model import attach_prefix
from ptuning.prefix import PrefixConfig
from tiny_models import batch, save_tiny_checkpoint, tiny_model

# ChatGLM2/3 config.json names for the tiny Llama's geometry: 2 layers, 2 kv groups x 8 channels, hidden 32
CHATGLM2_CONFIG = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": 2, "hidden_size": 32,
                   "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2,
                   "kv_channels": 8, "padded_vocab_size": 128, "pre_seq_len": 4, "prefix_projection": False}
P = 4
WIDTH = 2 * 2 * 2 * 8  # layers x (k, v) x kv heads x head dim


class NotATensor:
    """Anything a plain weights file should not contain."""

    def __init__(self):
        self.payload = "x"


def logits(model):
    ids, mask, _ = batch()
    with torch.no_grad():
        return model(ids, mask).logits


def write_chatglm(directory, tensors, config=CHATGLM2_CONFIG):
    """The layout ChatGLM's ptuning/main.py saves: only prefix_encoder weights, plus the model's config.json."""
    os.makedirs(directory, exist_ok=True)
    state = OrderedDict((f"transformer.prefix_encoder.{k}", v.half()) for k, v in tensors.items())
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def test_chatglm_config_geometry_matches_the_base():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        write_chatglm(d, {"embedding.weight": torch.zeros(P, WIDTH)})
        g = config_geometry(d)
    assert (g["num_layers"], g["num_kv_heads"], g["head_dim"], g["hidden_size"], g["vocab_size"]) == (2, 2, 8, 32, 128)
    assert g["architecture"] == "ChatGLMModel"


def test_chatglm_prefix_imports_with_chatglm_positions_and_equal_logits(tmp_path):
    torch.manual_seed(0)
    embedding = (torch.randn(P, WIDTH) * 0.5).half().float()  # the file is fp16, as ChatGLM saves it
    src = write_chatglm(tmp_path / "chatglm", {"embedding.weight": embedding})
    config = import_chatglm(src, str(tmp_path / "ours"))
    assert config.position_offset is False and config.pre_seq_len == P and not config.prefix_projection
    saved = json.loads((tmp_path / "ours" / "prefix_config.json").read_text())
    assert saved["position_offset"] is False and saved["base_architecture"] == "ChatGLMModel"

    direct = attach_prefix(tiny_model("llama"), P, position_offset=False)
    direct.prefix_encoder.embedding.weight.data.copy_(embedding)
    imported = load_prefix(tiny_model("llama"), str(tmp_path / "ours"))
    assert (logits(imported) - logits(direct)).abs().max() <= 1e-6
    shifted = attach_prefix(tiny_model("llama"), P, position_offset=True)
    shifted.prefix_encoder.embedding.weight.data.copy_(embedding)
    assert (logits(imported) - logits(shifted)).abs().max() > 1e-4  # the option matters


def test_chatglm2_projection_is_folded(tmp_path):
    # ChatGLM2/3: embedding is kv_size wide, trans = Linear(kv_size, hidden) -> Tanh -> Linear(hidden, kv_size)
    torch.manual_seed(1)
    tensors = {"embedding.weight": torch.randn(P, WIDTH), "trans.0.weight": torch.randn(32, WIDTH) * 0.3,
               "trans.0.bias": torch.randn(32) * 0.1, "trans.2.weight": torch.randn(WIDTH, 32) * 0.3,
               "trans.2.bias": torch.randn(WIDTH) * 0.1}
    tensors = {k: v.half().float() for k, v in tensors.items()}
    src = write_chatglm(tmp_path / "chatglm", tensors, {**CHATGLM2_CONFIG, "prefix_projection": True})
    config = import_chatglm(os.path.join(src, "pytorch_model.bin"), str(tmp_path / "ours"))
    assert not config.prefix_projection  # the MLP input is not hidden_size wide: only the folded prefix is kept
    mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, 32), torch.nn.Tanh(), torch.nn.Linear(32, WIDTH))
    mlp.load_state_dict({k.replace("trans.", ""): v for k, v in tensors.items() if k.startswith("trans.")})
    direct = attach_prefix(tiny_model("llama"), P, position_offset=False)
    with torch.no_grad():
        direct.prefix_encoder.embedding.weight.copy_(mlp(tensors["embedding.weight"]))
    imported = load_prefix(tiny_model("llama"), str(tmp_path / "ours"))
    assert (logits(imported) - logits(direct)).abs().max() <= 1e-5


def test_chatglm6b_projection_keeps_the_mlp_for_training(tmp_path):
    # ChatGLM-6B: embedding hidden_size wide, the same MLP shape as ours, so the source encoder applies directly
    direct = attach_prefix(tiny_model("llama"), P, prefix_projection=True, prefix_hidden_size=16,
                           position_offset=False)
    torch.manual_seed(2)
    for p in direct.prefix_encoder.parameters():
        p.data.copy_((torch.randn_like(p) * 0.4).half().float())
    v1_config = {"architectures": ["ChatGLMModel"], "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                 "vocab_size": 128}  # 2 heads of 16 channels: a different geometry, refused
    src = write_chatglm(tmp_path / "chatglm", direct.prefix_encoder.state_dict(), v1_config)
    with pytest.raises(UserError, match="head dim"):
        import_chatglm(src, str(tmp_path / "bad"))
    v1_config.update(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    src = write_chatglm(tmp_path / "chatglm", direct.prefix_encoder.state_dict(), v1_config)
    config = import_chatglm(src, str(tmp_path / "ours"))
    assert config.prefix_projection and config.prefix_hidden_size == 16
    assert (tmp_path / "ours" / "prefix_encoder.safetensors").exists()
    imported = load_prefix(tiny_model("llama"), str(tmp_path / "ours"))
    assert (logits(imported) - logits(direct)).abs().max() <= 1e-5
    trainable = load_prefix(tiny_model("llama"), str(tmp_path / "ours"), for_training=True)
    assert trainable.prefix_config.prefix_projection and (logits(trainable) - logits(direct)).abs().max() <= 1e-5


def test_pickled_objects_are_refused_not_unpickled(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"transformer.prefix_encoder.embedding.weight": torch.zeros(P, WIDTH), "extra": NotATensor()}, path)
    with pytest.raises(UserError, match="refused"):
        read_tensor_file(str(path))
    torch.save({"transformer.prefix_encoder.embedding.weight": torch.zeros(P, WIDTH), "step": 3}, path)
    with pytest.raises(UserError, match="not tensors: step"):
        read_tensor_file(str(path))
    (tmp_path / "config.json").write_text(json.dumps(CHATGLM2_CONFIG))
    with pytest.raises(UserError, match="refused"):
        import_chatglm(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_wrong_geometry_and_non_ptuning_files_are_named(tmp_path):
    src = write_chatglm(tmp_path / "a", {"embedding.weight": torch.zeros(P, WIDTH + 8)})
    with pytest.raises(UserError, match="prefix width 72 does not fit"):
        import_chatglm(src, str(tmp_path / "out"))
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, tmp_path / "a" / "pytorch_model.bin")
    with pytest.raises(UserError, match="no 'transformer.prefix_encoder.embedding.weight'"):
        import_chatglm(src, str(tmp_path / "out"))


def peft_model(seed=0, **config):
    model = get_peft_model(tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                                     **config))
    torch.manual_seed(seed)
    for p in model.prompt_encoder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def peft_logits(model):
    ids, mask, _ = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_our_prefix_exported_to_peft_gives_equal_logits(tmp_path):
    ours = attach_prefix(tiny_model("llama"), P, prefix_projection=True, prefix_hidden_size=16)
    torch.manual_seed(3)
    for p in ours.prefix_encoder.parameters():
        torch.nn.init.normal_(p, std=0.4)
    save_prefix(ours, str(tmp_path / "ours"))
    export_peft(str(tmp_path / "ours"), str(tmp_path / "peft"))
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "peft")).eval()
    assert loaded.peft_config["default"].peft_type == "PREFIX_TUNING"
    assert (peft_logits(loaded) - logits(ours)).abs().max() <= 1e-5


@pytest.mark.parametrize("projection", [False, True])
def test_peft_trained_prefix_imports_with_equal_logits(tmp_path, projection):
    source = peft_model(prefix_projection=projection, **({"encoder_hidden_size": 16} if projection else {}))
    source.save_pretrained(str(tmp_path / "peft"))
    model_dir = save_tiny_checkpoint(tmp_path / "model")
    config = import_peft(str(tmp_path / "peft"), str(tmp_path / "ours"), model_dir)
    assert config.position_offset is True and config.pre_seq_len == P
    ours = load_prefix(tiny_model("llama"), str(tmp_path / "ours"))
    assert (logits(ours) - peft_logits(source)).abs().max() <= 1e-5


def test_chatglm_positions_cannot_go_to_peft(tmp_path):
    model = attach_prefix(tiny_model("llama"), P, position_offset=False)
    save_prefix(model, str(tmp_path / "ours"))
    with pytest.raises(UserError, match="position_offset is false"):
        export_peft(str(tmp_path / "ours"), str(tmp_path / "peft"))


def test_convert_command_line_round_trip(tmp_path, capsys):
    torch.manual_seed(4)
    embedding = torch.randn(P, WIDTH).half().float()
    src = write_chatglm(tmp_path / "chatglm", {"embedding.weight": embedding})
    assert main.main(["convert", "--from", "chatglm", "--input", os.path.join(src, "pytorch_model.bin"),
                      "--output_dir", str(tmp_path / "ours")]) == 0
    assert PrefixConfig.from_json(tmp_path / "ours" / "prefix_config.json").position_offset is False
    assert main.main(["convert", "--to", "peft", "--input", str(tmp_path / "ours"), "--output_dir",
                      str(tmp_path / "peft")]) == 2
    assert "position_offset is false" in capsys.readouterr().err
    assert main.main(["convert", "--from", "chatglm", "--input", src, "--output_dir", str(tmp_path / "ours")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err

    model_dir = save_tiny_checkpoint(tmp_path / "model")
    peft_model(seed=5).save_pretrained(str(tmp_path / "peft_src"))
    assert main.main(["convert", "--from", "peft", "--input", str(tmp_path / "peft_src"), "--output_dir",
                      str(tmp_path / "from_peft"), "--model_name_or_path", model_dir]) == 0
    assert main.main(["convert", "--to", "peft", "--input", str(tmp_path / "from_peft"), "--output_dir",
                      str(tmp_path / "back"), "--model_name_or_path", model_dir]) == 0
    a = read_tensor_file(str(tmp_path / "peft_src" / "adapter_model.safetensors"))["prompt_embeddings"]
    b = read_tensor_file(str(tmp_path / "back" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(a, b)
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["base_model_name_or_path"] == model_dir


def test_convert_that_dies_midway_leaves_no_output_directory(tmp_path, monkeypatch):
    from ptuning import interop

    src = write_chatglm(tmp_path / "chatglm", {"embedding.weight": torch.randn(P, WIDTH)})

    def half_written(checkpoint, out_dir, model_config=None):
        (tmp_path / "staging_seen").write_text(out_dir)
        with open(os.path.join(out_dir, "prefix_model.safetensors"), "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # the user hits Ctrl-C mid-write

    monkeypatch.setattr(interop, "import_chatglm", half_written)
    with pytest.raises(KeyboardInterrupt):
        main.main(["convert", "--from", "chatglm", "--input", src, "--output_dir", str(tmp_path / "ours")])
    staging = (tmp_path / "staging_seen").read_text()
    assert os.path.dirname(staging) == str(tmp_path) and os.path.basename(staging).startswith(".ours.")
    assert not os.path.exists(tmp_path / "ours") and not os.path.exists(staging)


def test_convert_gives_directories_the_users_umask_and_records_an_absolute_base(tmp_path, monkeypatch):
    model_dir = save_tiny_checkpoint(tmp_path / "model")
    peft_model(seed=5).save_pretrained(str(tmp_path / "peft_src"))
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        assert main.main(["convert", "--from", "peft", "--input", "peft_src", "--output_dir", "ours",
                          "--model_name_or_path", "model"]) == 0
        assert main.main(["convert", "--to", "peft", "--input", "ours", "--output_dir", "back",
                          "--model_name_or_path", "model"]) == 0
    finally:
        os.umask(old)
    for name in ("ours", "back"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o755, name
    recorded = json.loads((tmp_path / "back" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == os.path.abspath(model_dir)
