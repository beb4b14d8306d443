"""The command line a new user meets first: help that fits on a screen, the console script, the installed package,
a clean demo output, and a model-preparation step whose stdout is exactly one path."""

import json
import os
import runpy
import subprocess
import sys

import pytest

import main
from ptuning import cli, runtime
from tiny_models import save_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def help_text(capsys, argv) -> str:
    assert main.main(argv) == 0
    return capsys.readouterr().out


def test_help_fits_on_a_screen_or_two_and_names_every_command(capsys):
    text = help_text(capsys, ["--help"])
    lines = text.splitlines()
    assert 40 <= len(lines) <= 100 and max(map(len, lines)) <= 120  # two screens at most
    for name in cli.COMMANDS:
        assert f"\n  {name} " in text
    for flag in ("--model_name_or_path DIR|HUB_ID", "--pre_seq_len N", "--train_file FILE", "--learning_rate X",
                 "--activation_checkpointing", "--deepspeed FILE", "--help_all"):
        assert flag in text
    assert "--gradient_checkpointing" not in text  # transformers 5's deprecated alias is not what we recommend
    assert len(help_text(capsys, ["--help_all"]).splitlines()) > 400  # everything is still one flag away


@pytest.mark.parametrize("command, own, foreign", [
    ("evaluate", ["--test_file FILE", "--ptuning_checkpoint DIR", "--predict_batch_size N"], ["--train_file"]),
    ("chat", ["--system_prompt TEXT", "--history_file FILE", "--temperature X"], ["--train_file", "--test_file"]),
    ("plan", ["--gpu_memory TEXT", "--world_size N", "--per_device_train_batch_size N"], ["--test_file"]),
])
def test_each_command_helps_with_itself_only(capsys, command, own, foreign):
    text = help_text(capsys, [command, "--help"])
    assert text.startswith(f"usage: python main.py {command} FLAGS")
    assert len(text.splitlines()) <= 45
    assert all(flag in text for flag in own) and not any(flag in text for flag in foreign)


def test_convert_help_is_its_own(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["convert", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--from" in text and "--to" in text and len(text.splitlines()) <= 30


def run_python(args, cwd, **env):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_console_script_and_main_py_print_the_same_help(tmp_path):
    script = run_python(["ptuning", "--help"], cwd=tmp_path)  # installed by scripts/setup.sh (pip install -e .)
    direct = run_python([sys.executable, os.path.join(ROOT, "main.py"), "--help"], cwd=tmp_path)
    assert script.returncode == direct.returncode == 0, script.stderr + direct.stderr
    assert script.stdout.replace("usage: ptuning", "usage: python main.py").replace(
        "'ptuning COMMAND", "'python main.py COMMAND").replace(": ptuning --help_all", ": python main.py --help_all") \
        == direct.stdout
    assert script.stderr == direct.stderr == ""


def test_installed_package_imports_from_anywhere_even_beside_a_folder_named_ptuning(tmp_path):
    (tmp_path / "ptuning").mkdir()  # e.g. the user's clone folder, next to their own script
    proc = run_python([sys.executable, "-c", "import ptuning, ptuning.cli; print(ptuning.__file__)"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == os.path.join(ROOT, "ptuning", "__init__.py")


def test_threads_follow_physical_cores_and_the_environment_wins():
    cores = runtime.physical_cores()
    assert 1 <= cores <= os.cpu_count()
    assert runtime.cpu_threads({}) == cores
    assert runtime.cpu_threads({"LOCAL_WORLD_SIZE": str(2 * cores)}) == 1
    env = {}
    runtime.configure_process(env)
    assert env["OMP_NUM_THREADS"] == str(cores) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}
    runtime.configure_process(env)
    assert env["OMP_NUM_THREADS"] == "7" and env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_training_run_prints_no_library_noise(tmp_path):
    """What a user reads is ours: no DeepSpeed accelerator warning, no bitsandbytes kernel hub message, no
    pin_memory warning, no deprecation warning for a flag we recommend (total_flos: tests/test_main.py)."""
    model_dir = save_tiny_checkpoint(tmp_path / "model")
    rows = [{"prompt": f"q{i}", "response": "a"} for i in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DS_ACCELERATOR")}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), "--model_name_or_path", model_dir, "--do_train",
         "--train_file", str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
         "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--activation_checkpointing",
         "--report_to", "none"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for noise in ("Setting accelerator to CPU", "kernels-community", "pin_memory", "deprecated", "Deprecated",
                  "Traceback"):
        assert noise not in output, noise
    assert "total_flos" in output and "train_loss" in output


def test_prepare_model_prints_only_the_path_whatever_libraries_print(tmp_path, monkeypatch, capfd):
    """train.sh does not read this stdout any more, but other scripts may: it must stay exactly one line."""
    prepare = runpy.run_path(os.path.join(ROOT, "scripts", "prepare_model.py"))
    convert = prepare["_convert"]

    def noisy_convert(gguf, target):
        print("[WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.")  # Python-level
        os.write(1, b"a C library writing to fd 1\n")  # below Python
        for name in prepare["REQUIRED_FILES"]:
            (target / name).write_text("x")

    convert.__globals__["_convert"] = noisy_convert
    convert.__globals__["gguf_path"] = lambda: tmp_path / "model.gguf"
    try:
        assert prepare["main"](["--out", str(tmp_path / "model")]) == 0
    finally:
        convert.__globals__["_convert"] = convert
    out, err = capfd.readouterr()
    assert out == f"{tmp_path / 'model'}\n"
    assert "Setting accelerator to CPU" in err and "a C library writing to fd 1" in err
    assert prepare["main"](["--out", str(tmp_path / "model")]) == 0  # the second run converts nothing
    assert capfd.readouterr().out == f"{tmp_path / 'model'}\n"


def test_train_sh_reads_no_program_output_as_a_path():
    text = open(os.path.join(ROOT, "scripts", "train.sh")).read()
    assert "$(python" not in text and "MODEL=.cache/smollm2-135m-instruct" in text
