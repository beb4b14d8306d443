"""End-to-end: main.py --task_type seq_cls|token_cls|qa on the demo's tiny BERT — learns, exports prefix + head,
predicts from the export without --task_type, resumes, and reports user mistakes in one line."""

import json
import os
import random
import runpy

import pytest

import main
from ptuning.nlu.model import HEAD_WEIGHTS
from ptuning.prefix import CONFIG_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = runpy.run_path(os.path.join(ROOT, "scripts", "make_nlu_demo.py"))


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlu_e2e")
    model_dir = DEMO["make_model"](root / "model")
    rng = random.Random(1)
    files = {
        "cls_train": write(root / "cls_train.jsonl", DEMO["cls_rows"](rng, 480, DEMO["CLS_TRAIN"])),
        "cls_dev": write(root / "cls_dev.jsonl", DEMO["cls_rows"](rng, 90, DEMO["CLS_DEV"])),
        "ner_train": write(root / "ner_train.jsonl", DEMO["ner_rows"](rng, 160, DEMO["NER_TRAIN"])),
        "ner_dev": write(root / "ner_dev.jsonl", DEMO["ner_rows"](rng, 40, DEMO["NER_DEV"])),
        "qa_train": write(root / "qa_train.jsonl", DEMO["qa_rows"](rng, 64, "train")),
        "qa_dev": write(root / "qa_dev.jsonl", DEMO["qa_rows"](rng, 16, "dev")),
    }
    return root, model_dir, files


def common(model_dir, out):
    return ["--model_name_or_path", model_dir, "--output_dir", str(out), "--report_to", "none", "--use_cpu",
            "--seed", "0", "--max_source_length", "48", "--per_device_eval_batch_size", "64", "--disable_tqdm", "true"]


def train_args(task, files, demo, epochs, extra=()):
    return ["--task_type", task, "--do_train", "--train_file", files[f"{demo}_train"], "--do_eval", "--validation_file",
            files[f"{demo}_dev"], "--do_predict", "--test_file", files[f"{demo}_dev"], "--pre_seq_len", "16",
            "--learning_rate", "3e-2", "--lr_scheduler_type", "constant", "--max_grad_norm", "0",
            "--num_train_epochs", str(epochs), "--per_device_train_batch_size", "32", "--logging_steps", "5",
            "--save_strategy", "epoch", "--save_total_limit", "2", *extra]


def results(out, split):
    with open(os.path.join(out, f"{split}_results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def cls_run(workspace):
    root, model_dir, files = workspace
    out = root / "cls"
    assert main.main(common(model_dir, out) + train_args("seq_cls", files, "cls", 12)) == 0
    return out


def test_classification_learns_well_above_chance_and_exports_prefix_and_head(cls_run):
    before = results(cls_run, "eval_before_training")["eval_before_training_accuracy"]
    after = results(cls_run, "eval")
    assert after["eval_accuracy"] >= 0.6 and after["eval_accuracy"] > before + 0.2  # 3 classes: chance is 1/3
    assert after["eval_macro_f1"] >= 0.55
    exported = {CONFIG_NAME, "prefix_model.safetensors", HEAD_WEIGHTS}
    assert exported <= set(os.listdir(cls_run))
    assert not any(n.startswith("model") or n.endswith((".bin", ".pt")) for n in os.listdir(cls_run))
    config = json.loads((cls_run / CONFIG_NAME).read_text())
    assert config["task_type"] == "seq_cls" and config["labels"] == ["negative", "neutral", "positive"]
    checkpoints = sorted(n for n in os.listdir(cls_run) if n.startswith("checkpoint-"))
    assert len(checkpoints) == 2
    for ckpt in checkpoints:
        names = set(os.listdir(cls_run / ckpt))
        assert exported <= names and "trainer_state.json" in names
        assert not any(n.startswith("model") for n in names)
        weights = sum(os.path.getsize(cls_run / ckpt / n) for n in exported)
        assert weights < 100_000


def test_predict_from_the_export_needs_no_task_type_and_matches(workspace, cls_run, tmp_path):
    _, model_dir, files = workspace
    argv = common(model_dir, tmp_path) + ["--ptuning_checkpoint", str(cls_run), "--do_predict", "--test_file",
                                          files["cls_dev"]]
    assert main.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert (tmp_path / "predictions.jsonl").read_text() == (cls_run / "predictions.jsonl").read_text()
    assert len(rows) == 90 and set(rows[0]) == {"text", "label", "prediction"}
    assert results(tmp_path, "predict")["predict_accuracy"] == results(cls_run, "eval")["eval_accuracy"]


def test_the_default_length_shrinks_to_fit_a_small_encoder_but_an_explicit_one_does_not(workspace, cls_run, tmp_path):
    _, model_dir, files = workspace
    argv = common(model_dir, tmp_path) + ["--ptuning_checkpoint", str(cls_run), "--do_predict", "--test_file",
                                          files["cls_dev"]]
    argv[argv.index("--max_source_length") + 1] = "256"  # the default: 16 + 256 > the demo BERT's 128 positions
    assert main.main(argv) == 0
    assert (tmp_path / "predictions.jsonl").read_text() == (cls_run / "predictions.jsonl").read_text()


def test_token_classification_learns_entities(workspace, tmp_path):
    _, model_dir, files = workspace
    assert main.main(common(model_dir, tmp_path) + train_args("token_cls", files, "ner", 12)) == 0
    before, after = results(tmp_path, "eval_before_training"), results(tmp_path, "eval")
    assert after["eval_f1"] >= 0.8 and after["eval_f1"] > before["eval_before_training_f1"] + 0.5
    row = json.loads((tmp_path / "predictions.jsonl").read_text().splitlines()[0])
    assert len(row["prediction"]) == len(row["tokens"]) == len(row["label"])


def test_qa_trains_evaluates_and_resumes_from_the_latest_checkpoint(workspace, tmp_path):
    _, model_dir, files = workspace
    argv = common(model_dir, tmp_path) + train_args("qa", files, "qa", 2, ["--doc_stride", "16"])
    assert main.main(argv) == 0
    assert {"eval_exact_match", "eval_f1"} <= set(results(tmp_path, "eval"))
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"dev-{i}" for i in range(16)]
    head = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert head["task_type"] == "qa" and head["labels"] == []
    # two more epochs on top of the last checkpoint: restores prefix + head + optimizer, continues the step count
    argv = common(model_dir, tmp_path) + train_args("qa", files, "qa", 4, ["--doc_stride", "16",
                                                                           "--resume_from_checkpoint", "latest"])
    assert main.main(argv) == 0
    state = json.loads((tmp_path / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8


@pytest.mark.parametrize("extra,message", [
    (["--task_type", "seq_cls", "--do_predict", "--test_file", "{cls_dev}"], "needs --ptuning_checkpoint"),
    (["--task_type", "seq_cls", "--do_train", "--train_file", "{bad}"], "bad.jsonl: row 2: field 'label': missing"),
    (["--task_type", "seq_cls", "--do_train", "--train_file", "{cls_train}", "--max_source_length", "120"],
     "--max_source_length 120 with --pre_seq_len 16 needs more than the 128 position embeddings"),
    (["--task_type", "qa", "--do_train", "--train_file", "{qa_train}", "--doc_stride", "48"], "--doc_stride"),
    (["--task_type", "seq_cls", "--prompt", "hi"], "--prompt is for causal LMs"),
])
def test_user_mistakes_are_one_line_errors(workspace, tmp_path, capsys, extra, message):
    root, model_dir, files = workspace
    files = dict(files, bad=write(root / "bad.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}]))
    argv = common(model_dir, tmp_path / "out") + [a.format(**files) for a in extra] + ["--pre_seq_len", "16"]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1  # before any model is loaded
