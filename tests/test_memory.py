"""The memory planner: its prediction against the measured peak of real steps on tiny models (CPU allocator
events, see ptuning/memory.py), its arithmetic for a 6B GLM against a hand computation, the `plan` command line,
the refusal of a quantized base under ZeRO-3, bench/memory.py and the low-VRAM preset."""

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import main
from ptuning import memory
from ptuning.args import parse_args
from ptuning.errors import UserError
from ptuning.memory import GiB, Geometry, Setup, measure_step, plan, state_bytes, weight_bytes
from ptuning.model import attach_prefix, load_base_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
            bos_token_id=2)
GPT2 = dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)
CASES = {  # id: (model_type, torch_dtype, quantization, gradient checkpointing[, loss_chunk_rows])
    "llama-bf16": ("llama", "bf16", {}, False),
    "llama-bf16-gc": ("llama", "bf16", {}, True),
    "glm-nf4-gc": ("glm", "bf16", dict(quantization_bit=4), True),
    "glm-fp4-double": ("glm", "bf16", dict(quantization_bit=4, quant_type="fp4", double_quant=True), False),
    "qwen2-int8": ("qwen2", "bf16", dict(quantization_bit=8), False),
    "qwen2-int8-gc": ("qwen2", "bf16", dict(quantization_bit=8), True),
    "glm4-fp32-gc": ("glm4", "fp32", {}, True),
    "gpt2-fp32": ("gpt2", "fp32", {}, False),
    # 7 target tokens a chunk (7 chunks): the final norm's backward sets the peak; and the logits_to_keep path
    "llama-bf16-7-rows": ("llama", "bf16", {}, False, 7),
    "glm-nf4-unchunked": ("glm", "bf16", dict(quantization_bit=4), False, 0),
}


def tiny_config(model_type):
    config = AutoConfig.for_model(model_type, **(GPT2 if model_type == "gpt2" else TINY))
    config.architectures = [type(AutoModelForCausalLM.from_config(config)).__name__]
    return config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    paths = {}
    for model_type in sorted({case[0] for case in CASES.values()}):
        config = tiny_config(model_type)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / model_type)
        paths[model_type] = str(root / model_type)
    return paths


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_is_within_15_percent_of_the_measured_peak(checkpoints, case):
    model_type, dtype, quantization, gc, *rows = CASES[case]
    rows = rows[0] if rows else None
    path = checkpoints[model_type]
    from ptuning.model import DTYPES, quantization_config

    base = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], quantization_config=quantization_config(
        quantization.get("quantization_bit"), DTYPES[dtype], quantization.get("quant_type", "nf4"),
        quantization.get("double_quant", False)))
    b, source, target, p = 2, 24, 24, 16
    model = attach_prefix(base, p)
    model.loss_chunk_rows = rows
    assert (model._chunkable_lm_head() is not None) == (rows != 0)  # 4/8-bit bases too: their LM head stays bf16
    model.train()
    if gc:
        model.gradient_checkpointing_enable()
    ids = torch.randint(3, 500, (b, source + target), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :source] = -100
    opt = torch.optim.AdamW(model.prefix_encoder.parameters())

    def step():
        model(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the AdamW moments
    before, peak = measure_step(step, model, opt)
    setup = Setup(dtype=dtype, batch=b, source_len=source, target_len=target, loss_columns=target, pre_seq_len=p,
                  gradient_checkpointing=gc, device="cpu", loss_chunk_rows=rows, **quantization)
    predicted = plan(AutoConfig.from_pretrained(path), setup)
    if rows == 7:
        assert predicted.phase == "final norm backward"
    assert sum(weight_bytes(predicted.geometry, setup)) == state_bytes(model.base)  # to the byte
    measured = before + peak
    assert abs(predicted.peak / measured - 1) <= 0.15, (predicted.peak, measured, predicted.terms)


def test_measure_step_sees_every_allocation_in_order():
    def step():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB
        del a
        c = torch.empty(2000, 1000)  # 8 MB: 10 MB live
        del b, c

    held = torch.empty(250, 1000)
    assert measure_step(step, held) == (1_000_000, 10_000_000)


CHATGLM3 = dict(vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
                num_attention_heads=32, num_key_value_heads=2, head_dim=128, pad_token_id=0, dtype="bfloat16")


def chatglm3_config():
    config = AutoConfig.for_model("glm", **CHATGLM3)
    config.architectures = ["GlmForCausalLM"]
    return config


def test_chatglm3_6b_int4_plan_equals_the_hand_computation():
    """ChatGLM-6B's P-tuning defaults (pre_seq_len 128, 64 + 64 tokens, batch 1) with NF4 and checkpointing."""
    result = plan(chatglm3_config(), Setup(dtype="bf16", quantization_bit=4, batch=1, source_len=64,
                                          target_len=64, pre_seq_len=128, gradient_checkpointing=True))
    h, f, L, V = 4096, 13696, 28, 65024
    # per layer q 4096x4096, k and v 256x4096, o 4096x4096, gate_up 27392x4096, down 4096x13696
    per_layer = 2 * 4096 * 4096 + 2 * 256 * 4096 + 27392 * 4096 + 4096 * 13696
    assert per_layer == 203_948_032
    # 4 bits = 1/2 byte, one fp32 absmax per 64 weights = 1/16 byte, a 16-entry fp32 codebook per linear
    linears = L * (per_layer // 2 + per_layer // 16 + 6 * 64)
    assert linears == 3_212_192_256
    # embeddings + untied LM head, 57 RMSNorm weights, q/k/v biases: bf16; RoPE inv_freq (32 + 32 fp32)
    other = 2 * V * h * 2 + 57 * h * 2 + L * (4096 + 2 * 256) * 2 + 4 * 64
    assert other == 1_066_078_464
    prefix_params = 128 * L * 2 * 256  # pre_seq_len x (layers x keys/values x 2 kv heads x 128)
    assert prefix_params == 1_835_008
    state = 12 * prefix_params  # fp32 weights + AdamW's two moments
    b, s, p = 1, 128, 128
    kv = b * p * (L * 2 * 256) * 2  # prefix keys/values of every layer, cast to bf16
    kept = L * b * s * h * 2 + b * s * (p + s) + kv + 2 * b * s * 64 * 2  # layer inputs, bool mask, K/V, RoPE
    assert kept == 33_095_680
    layer = (b * s * (p + s) * 2            # float attention bias
             + b * 32 * s * 128 * 2 * 2     # queries and output
             + 2 * b * 32 * (p + s) * 128 * 2  # keys and values, repeated to 32 heads
             + 4 * b * 32 * s               # logsumexp
             + 2 * (4 * b * s * h + 4 * b * s)  # two RMSNorms, fp32
             + 3 * b * s * f * 2)           # gate, up, act(gate)
    assert layer == 21_087_232
    dequant = 27392 * 4096 * 2  # gate_up dequantized to bf16 in backward: the biggest linear
    transient = layer + b * s * h * 2 + dequant + 2 * b * s * f * 2 + kv
    # chunked loss: final norm (fp32 input, 1/rms), decoder output, 64 target hidden states and their gradient,
    # one chunk of min(64, 32 MiB // (4 V) = 129) rows: fp32 logits + logsumexp's temporary; int64 mask, positions
    loss = 4 * b * s * h + 4 * b * s + b * s * h * 2 + 2 * 64 * h * 2 + 8 * 64 * V + 8 * b * (p + 2 * s)
    final_norm = 4 * b * s * h + 4 * b * s + 20 * b * s * h
    assert transient > loss > final_norm and result.phase == "layer backward"
    assert result.terms == {"weights: linears": linears, "weights: embeddings, LM head, norms": other,
                            "prefix state": state, "activations": kept, "transient": transient}
    assert result.peak == 4_590_599_936  # 4.28 GiB: fits 8 GB with room, as ChatGLM-6B's "7 GB" did
    assert result.needed <= 5.5 * GiB


def test_chatglm3_6b_bf16_and_int8_plans():
    setup = Setup(dtype="bf16", batch=1, source_len=64, target_len=64, pre_seq_len=128)
    bf16 = plan(chatglm3_config(), setup)
    assert bf16.terms["weights: linears"] == 28 * 203_948_032 * 2
    # chunked loss (see above): 64 target tokens in one chunk; checkpointing counts the prefix keys/values already
    assert bf16.phase == "loss" and bf16.terms["transient"] == (4 * 128 * 4096 + 4 * 128 + 128 * 4096 * 2
                                                               + 2 * 64 * 4096 * 2 + 8 * 64 * 65024 + 8 * (128 + 256))
    # the logits_to_keep path (ZeRO-3, or loss_chunk_rows = 0): the final norm and 12 b T V
    unchunked = plan(chatglm3_config(), Setup(dtype="bf16", batch=1, source_len=64, target_len=64, pre_seq_len=128,
                                              loss_chunk_rows=0))
    assert unchunked.phase == "loss" and unchunked.terms["transient"] == 4 * 128 * 4096 + 4 * 128 + 12 * 64 * 65024
    zero3 = plan(chatglm3_config(), Setup(dtype="bf16", batch=1, source_len=64, target_len=64, pre_seq_len=128,
                                          zero_stage=3, world_size=2))
    assert zero3.terms["transient"] == unchunked.terms["transient"]
    # without checkpointing, the chunked loss also holds the prefix keys/values cast to bf16 (b p 2Lgd c)
    no_gc = plan(chatglm3_config(), Setup(dtype="bf16", batch=1, source_len=64, target_len=64, pre_seq_len=128,
                                          gradient_checkpointing=False))
    assert no_gc.terms["transient"] - bf16.terms["transient"] == 128 * 28 * 2 * 256 * 2
    # several chunks: 129 rows of 65024 fp32 logits (~32 MiB) at a time, for 4 × 128 target tokens
    big = plan(chatglm3_config(), Setup(dtype="bf16", batch=4, source_len=64, target_len=128, pre_seq_len=128))
    assert big.setup.target_tokens == 512 and big.setup.loss_rows(65024) == 129
    assert 11.5 * GiB < bf16.peak < 12 * GiB
    int8 = plan(chatglm3_config(), Setup(dtype="bf16", quantization_bit=8, batch=1, source_len=64, target_len=64,
                                         pre_seq_len=128))
    # int8 rows + an fp32 scale per output row
    out_rows = 4096 + 256 + 256 + 4096 + 27392 + 4096
    assert int8.terms["weights: linears"] == 28 * (203_948_032 + 4 * out_rows)
    # the int8 matmul keeps its inputs even under checkpointing: (2h + Hd + f) b s c per layer
    assert int8.terms["activations"] - bf16.terms["activations"] == 28 * (2 * 4096 + 4096 + 13696) * 128 * 2
    no_gc = plan(chatglm3_config(), Setup(dtype="bf16", quantization_bit=4, batch=4, source_len=64, target_len=128,
                                          pre_seq_len=128, gradient_checkpointing=False))
    gc = plan(chatglm3_config(), Setup(dtype="bf16", quantization_bit=4, batch=4, source_len=64, target_len=128,
                                       pre_seq_len=128, gradient_checkpointing=True))
    assert no_gc.peak > gc.peak + GiB  # checkpointing is what makes batch 4 cheap


def test_loss_columns_default_to_the_worst_case_for_batches():
    """The logits_to_keep path keeps the union of the batch's target columns; the chunked loss only real targets."""
    assert Setup(batch=1, source_len=64, target_len=64).columns == 64
    assert Setup(batch=4, source_len=64, target_len=64).columns == 127
    assert Setup(batch=4, source_len=64, target_len=64, loss_columns=64).columns == 64
    assert Setup(batch=4, source_len=64, target_len=64).target_tokens == 256
    assert Setup(batch=4, source_len=64, target_len=64, loss_columns=100).target_tokens == 400
    assert Setup().chunked_loss and Setup(quantization_bit=4).chunked_loss
    assert not Setup(zero_stage=3).chunked_loss and not Setup(loss_chunk_rows=0).chunked_loss
    from ptuning.model import LOSS_CHUNK_BYTES

    assert Setup(batch=1, target_len=64).loss_rows(512) == 64  # fewer targets than a chunk holds
    assert Setup(batch=64, target_len=512).loss_rows(151552) == LOSS_CHUNK_BYTES // (4 * 151552) == 55
    assert Setup(batch=64, target_len=512).loss_rows(2**26) == 1
    assert Setup(batch=4, target_len=64, loss_chunk_rows=7).loss_rows(512) == 7


@pytest.fixture
def config_dir(tmp_path):
    """A directory with a config.json and no weights: the planner must never need them."""
    chatglm3_config().save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == ["config.json"]
    return tmp_path


def test_plan_command_prints_the_terms_and_the_verdict(config_dir, capsys):
    argv = ["plan", "--model_name_or_path", str(config_dir / "config.json"), "--quantization_bit", "4",
            "--torch_dtype", "bf16", "--per_device_train_batch_size", "1", "--max_source_length", "64",
            "--max_target_length", "64", "--pre_seq_len", "128", "--gradient_checkpointing", "--gpu_memory", "8GB"]
    assert main.main(argv) == 0
    out = capsys.readouterr().out
    assert "GlmForCausalLM (28 layers, hidden 4096" in out and "base INT4 nf4, compute bf16;" in out
    assert "expected peak (torch.cuda.max_memory_allocated)" in out and "= 4.28 GiB" in out
    assert "on an 8.00 GiB card: fits" in out
    argv[argv.index("4")] = "8"
    argv[argv.index("8GB")] = "6GB"
    assert main.main(argv) == 1  # scripts branch on the exit status
    captured = capsys.readouterr()
    assert "on a 6.00 GiB card: does NOT fit" in captured.out
    assert captured.err.startswith("error: plan: the run needs ") and "does not fit on a 6.00 GiB card" in captured.err
    assert captured.err.count("\n") == 1


def test_plan_in_front_of_a_whole_training_command_is_its_dry_run(config_dir, capsys):
    argv = ["plan", "--model_name_or_path", str(config_dir), "--do_train", "--train_file", "x.jsonl", "--output_dir",
            "/nonexistent/out", "--learning_rate", "2e-2", "--max_steps", "3000", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "4", "--pre_seq_len", "128", "--deepspeed",
            os.path.join(ROOT, "ds_configs", "zero2.json")]
    assert main.main(argv) == 0
    out = capsys.readouterr().out
    assert "base bfloat16 (not quantized)" in out  # "auto" resolves to the checkpoint's dtype
    assert "batch 4 × 384 tokens (256 source + 128 target, chunked loss on 128 target tokens per row)" in out
    assert "gradient checkpointing off" in out and "with --activation_checkpointing the peak would be" in out
    assert "1 GPU, ZeRO-2" in out and "DeepSpeed buffers" in out
    argv[-1] = os.path.join(ROOT, "ds_configs", "zero3.json")  # a partitioned LM head: the logits_to_keep loss
    assert main.main(argv) == 0
    assert "(256 source + 128 target, loss on 383 columns)" in capsys.readouterr().out


def test_plan_errors_are_one_line(tmp_path, capsys):
    assert main.main(["plan", "--model_name_or_path", str(tmp_path)]) == 2
    assert "cannot load a model config" in capsys.readouterr().err
    assert main.main(["plan"]) == 2
    assert "--model_name_or_path is required" in capsys.readouterr().err
    with pytest.raises(UserError, match="--gpu_memory"):
        memory.parse_size("lots")


def test_sizes():
    assert memory.parse_size("8GB") == memory.parse_size("8 GiB") == memory.parse_size("8") == 8 * GiB
    assert memory.parse_size("7.5G") == int(7.5 * GiB)
    assert memory.parse_size("8192MB") == 8 * GiB


ZERO3_MESSAGE = "cannot be combined with DeepSpeed ZeRO-3"


def test_zero3_with_a_quantized_base_is_refused_before_anything_loads(config_dir, capsys):
    zero3 = os.path.join(ROOT, "ds_configs", "zero3.json")
    argv = ["--model_name_or_path", str(config_dir), "--quantization_bit", "4", "--deepspeed", zero3,
            "--output_dir", "/nonexistent/out"]
    with pytest.raises(UserError, match=ZERO3_MESSAGE + r".*zero3.json.*Use ZeRO-2 or plain DDP"):
        parse_args(argv)
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert ZERO3_MESSAGE in err and "Traceback" not in err
    assert main.main(["plan"] + argv) == 2
    assert ZERO3_MESSAGE in capsys.readouterr().err
    inline = json.dumps({"zero_optimization": {"stage": 3}})
    with pytest.raises(UserError, match=ZERO3_MESSAGE):
        parse_args(argv[:5] + [inline])


def test_zero2_and_ddp_with_a_quantized_base_are_fine():
    assert memory.zero_stage(os.path.join(ROOT, "ds_configs", "zero2.json")) == 2
    assert memory.zero_stage(os.path.join(ROOT, "ds_configs", "zero3_offload.json")) == 3
    assert memory.zero_stage(None) == 0
    memory.check_quantization_zero(4, 2)
    memory.check_quantization_zero(8, 0)
    memory.check_quantization_zero(None, 3)
    with pytest.raises(UserError, match="not a JSON object"):
        memory.zero_stage("/nonexistent/ds.json")


def test_load_base_model_refuses_quantization_when_zero3_is_active(config_dir, monkeypatch):
    """Library use: TrainingArguments with a ZeRO-3 config built before ptuning.load()."""
    import ptuning.model

    monkeypatch.setattr(ptuning.model, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(UserError, match=ZERO3_MESSAGE):
        load_base_model(str(config_dir), quantization_bit=4)


def test_geometry_of_every_supported_family():
    glm4 = AutoConfig.for_model("glm4", **TINY)
    glm4.architectures = ["Glm4ForCausalLM"]
    assert Geometry.from_config(glm4).norms_per_layer == 4
    gpt2 = Geometry.from_config(tiny_config("gpt2"))
    assert (gpt2.ffn, gpt2.tied_embeddings, gpt2.gated_mlp, gpt2.rotary_dim) == (256, True, False, 0)
    glm = Geometry.from_config(chatglm3_config())
    assert (glm.rotary_dim, glm.qkv_bias, glm.tied_embeddings) == (64, True, False)


def test_bench_runs_on_cpu_with_a_small_config(tmp_path, capsys):
    """bench/memory.py end to end (each variant in its own process), on a micro GLM: planned within 15 %."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(ROOT, "bench", "memory.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "memory.md"
    argv = ["--config", "micro", "--dtypes", "int4", "--batches", "2", "--gc", "on", "--steps", "1",
            "--source_len", "16", "--target_len", "16", "--pre_seq_len", "8", "--model_dir", str(tmp_path / "model"),
            "--device", "cpu", "--out", str(out)]
    assert bench.main(argv) == 0, capsys.readouterr().err[-3000:]
    table = out.read_text()
    assert "Command: `python bench/memory.py --config micro --dtypes int4" in table
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| int4")]
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [("int4", "2", "on")]
    assert abs(float(rows[0][6].strip().rstrip("%"))) <= 15 and float(rows[0][7]) > 0


def run_script(env):
    import subprocess

    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "train_lowvram.sh")], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)


def test_lowvram_preset_plans_first_and_stops_when_it_does_not_fit(config_dir):
    proc = run_script({"MODEL": str(config_dir), "GPU_MEMORY": "4GB"})
    assert "base INT4 nf4 + double quant, compute bf16; batch 1 × 128 tokens" in proc.stdout, proc.stderr[-2000:]
    assert "gradient checkpointing on" in proc.stdout and "on a 4.00 GiB card: does NOT fit" in proc.stdout
    assert proc.returncode == 1 and "not starting" in proc.stderr
