"""NLU checkpoints: prefix + task head + config only, identical logits after reload, clear errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from nlu_tiny import random_batch, save_tiny_encoder
from ptuning.errors import UserError
from ptuning.nlu import is_nlu_run
from ptuning.nlu.model import HEAD_WEIGHTS, load, read_nlu_config, save_nlu
from ptuning.prefix import CONFIG_NAME, PrefixConfig

LABELS = {"seq_cls": ["neg", "pos", "mixed"], "token_cls": ["O", "B-PER", "I-PER"], "qa": []}


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {family: save_tiny_encoder(root / family, family) for family in ("bert", "electra")}


def trained(base_dir, task_type, projection=False):
    model, _ = load(base_dir, task_type=task_type, labels=LABELS[task_type], pre_seq_len=4,
                    prefix_projection=projection, prefix_hidden_size=8, for_training=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)  # stand-in for training
    return model.eval()


def outputs(model, family="bert"):
    ids, mask = random_batch(family)
    with torch.no_grad():
        out = model(ids, mask)
    return out.logits if hasattr(out, "logits") and out.logits is not None else torch.stack([out.start_logits,
                                                                                             out.end_logits])


@pytest.mark.parametrize("family,task_type,projection", [("bert", "seq_cls", False), ("bert", "token_cls", True),
                                                         ("electra", "qa", False), ("electra", "seq_cls", True)])
def test_round_trip_gives_identical_outputs_and_writes_only_prefix_head_config(base_dirs, tmp_path, family, task_type,
                                                                               projection):
    model = trained(base_dirs[family], task_type, projection)
    save_nlu(model, tmp_path)
    expected = {CONFIG_NAME, "prefix_model.safetensors", HEAD_WEIGHTS} | (
        {"prefix_encoder.safetensors"} if projection else set())
    assert set(os.listdir(tmp_path)) == expected
    head = load_file(tmp_path / HEAD_WEIGHTS)
    head_module = "qa_outputs" if task_type == "qa" else "classifier"
    assert head and all(k.startswith(head_module + ".") for k in head)
    assert sum(os.path.getsize(tmp_path / n) for n in expected) < 200_000
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["task_type"] == task_type and config["labels"] == LABELS[task_type]
    assert config["base_architecture"].startswith(family.capitalize())

    reloaded, tokenizer = load(base_dirs[family], str(tmp_path))
    assert not any(p.requires_grad for p in reloaded.parameters())
    assert reloaded.config.id2label == model.config.id2label
    assert torch.equal(outputs(model, family), outputs(reloaded, family))
    resumed, _ = load(base_dirs[family], str(tmp_path), for_training=True)
    assert resumed.prefix_config.prefix_projection == projection
    assert (outputs(model, family) - outputs(resumed.eval(), family)).abs().max() <= 1e-5


def test_checkpoints_from_before_the_task_fields_still_load_as_causal_lm(tmp_path):
    old = {"pre_seq_len": 4, "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "hidden_size": 32,
           "prefix_projection": False, "base_architecture": "LlamaForCausalLM", "format_version": 1}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(old))
    config = PrefixConfig.from_json(tmp_path / CONFIG_NAME)
    assert config.task_type == "causal_lm" and config.labels == []
    with pytest.raises(UserError, match="holds a causal_lm prefix"):
        read_nlu_config(str(tmp_path))


def test_wrong_task_or_label_count_is_named(base_dirs, tmp_path):
    save_nlu(trained(base_dirs["bert"], "seq_cls"), tmp_path)
    with pytest.raises(UserError, match="trained for --task_type seq_cls, not qa"):
        load(base_dirs["bert"], str(tmp_path), task_type="qa")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["labels"] = ["neg", "pos"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"classifier.bias has shape \(3,\), the model's is \(2,\)"):
        load(base_dirs["bert"], str(tmp_path))
    os.remove(tmp_path / HEAD_WEIGHTS)
    with pytest.raises(UserError, match="task_head.safetensors: missing"):
        load(base_dirs["bert"], str(tmp_path))


def test_an_nlu_checkpoint_routes_main_to_the_nlu_flow_without_task_type(base_dirs, tmp_path):
    class Args:
        task_type, ptuning_checkpoint = "causal_lm", None

    args = Args()
    assert not is_nlu_run(args)
    save_nlu(trained(base_dirs["bert"], "token_cls"), tmp_path)
    args.ptuning_checkpoint = str(tmp_path)
    assert is_nlu_run(args) and args.task_type == "token_cls"
