"""The bad-input corpus (tests/bad_inputs/cases.yaml): each case goes through the real entry point and must exit
non-zero with its one-line message, no traceback, before loading any weights, leaving existing output untouched."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

import main
from ptuning.export import save_prefix
from ptuning.model import attach_prefix
from ptuning.prefix import CONFIG_NAME
from tiny_models import save_tiny_checkpoint, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "tests", "bad_inputs")
INPUTS = os.path.join(CORPUS, "files")
with open(os.path.join(CORPUS, "cases.yaml"), encoding="utf-8") as f:
    CASES = yaml.safe_load(f)
COMMON = ("--model_name_or_path {model} --output_dir {out} --use_cpu --report_to none --pre_seq_len 4 "
          "--max_source_length 64 --max_target_length 32")
SUBPROCESS_CASES = ("row_empty_response", "checkpoint_wrong_layer_count", "pre_seq_len_not_a_number")


def test_corpus_is_large_and_distinct():
    names = [case["name"] for case in CASES]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert len({case["argv"] + json.dumps(case.get("checkpoint"), sort_keys=True) for case in CASES}) == len(CASES)
    assert all(case.get("expect") for case in CASES)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    model_dir = save_tiny_checkpoint(root / "model")
    good = root / "prefix"
    save_prefix(attach_prefix(tiny_model("llama"), 4), str(good))
    return {"model": model_dir, "prefix": good, "root": root}


def _build_checkpoint(spec: dict, workspace, path):
    """A prefix for a tiny Llama (with `model` overrides), then damaged as the case says."""
    if spec.get("model"):
        save_prefix(attach_prefix(tiny_model("llama", **spec["model"]), spec.get("pre_seq_len", 4)), str(path))
    else:
        shutil.copytree(workspace["prefix"], path)
    for name in spec.get("delete", []):
        os.remove(path / name)
    if spec.get("truncate"):
        data = (path / spec["truncate"]).read_bytes()
        (path / spec["truncate"]).write_bytes(data[: len(data) // 2])
    if spec.get("config"):
        config = json.loads((path / CONFIG_NAME).read_text())
        config.update(spec["config"])
        (path / CONFIG_NAME).write_text(json.dumps(config))
    if "config_text" in spec:
        (path / CONFIG_NAME).write_bytes(spec["config_text"].encode(spec.get("config_encoding", "utf-8")))
    return path


def _previous_run(workspace, out):
    """An output directory as a finished run leaves it: exported prefix, a checkpoint, and a file of the user's."""
    shutil.copytree(workspace["prefix"], out)
    shutil.copytree(workspace["prefix"], out / "checkpoint-5")
    (out / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": []}))
    (out / "sentinel.txt").write_text("the user's notes: must survive every failed run\n")


def snapshot(top) -> dict:
    """Every entry under ``top`` (itself included): kind, mode, mtime and, for files, the bytes."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [None, *filenames]:
            path = dirpath if name is None else os.path.join(dirpath, name)
            st = os.stat(path)
            content = None if name is None else open(path, "rb").read()
            state[os.path.relpath(path, top)] = (st.st_mode, st.st_mtime_ns, st.st_size, content)
    return state


def prepare(case, workspace, tmp_path):
    """The case's argv with placeholders filled, and the directories it must leave untouched."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "file").write_text("a plain file, not a directory\n")
    out = tmp_path / "out"
    _previous_run(workspace, out)
    ckpt = _build_checkpoint(case["checkpoint"], workspace, tmp_path / "ckpt") if "checkpoint" in case else None
    values = {"model": workspace["model"], "out": str(out), "inputs": INPUTS, "tmp": str(tmp),
              "ckpt": str(ckpt) if ckpt else "{ckpt}"}
    argv = []
    for token in case["argv"].replace("{common}", COMMON).split():
        argv.append(token.format(**values))
    expect = case["expect"].format(**values) if "{" in case["expect"] else case["expect"]
    return argv, expect, [out, INPUTS, workspace["model"]]


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if anything tries to load model weights."""
    import transformers

    import ptuning

    def refuse(*args, **kwargs):
        pytest.fail("model weights were loaded before the bad input was reported")

    monkeypatch.setattr(ptuning, "load", refuse)
    monkeypatch.setattr("ptuning.model.load_base_model", refuse)
    for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                 "AutoModelForQuestionAnswering"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_bad_input_is_refused_in_one_line(case, workspace, tmp_path, capsys, no_weights):
    argv, expect, untouched = prepare(case, workspace, tmp_path)
    before = [snapshot(path) for path in untouched]
    code = main.main(argv)
    err = capsys.readouterr().err
    assert code != 0, f"exit code 0; stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one 'error: ' line: {err!r}"
    assert expect in lines[0]
    assert [snapshot(path) for path in untouched] == before, "a failed run changed existing files"


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_cli_prints_one_line_and_no_traceback(name, workspace, tmp_path):
    case = next(c for c in CASES if c["name"] == name)
    argv, expect, untouched = prepare(case, workspace, tmp_path)
    before = [snapshot(path) for path in untouched]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr
    assert [snapshot(path) for path in untouched] == before
