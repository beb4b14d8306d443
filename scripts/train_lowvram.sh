#!/usr/bin/env bash
# Low-VRAM preset: P-Tuning v2 of a ~6B chat model on one 8 GB card. INT4 (NF4) base through bitsandbytes,
# bf16 compute, non-reentrant gradient checkpointing, batch 1 x 16 accumulation, ChatGLM-6B's P-tuning shapes
# (pre_seq_len 128, 64 source + 64 target tokens). It first prints the memory plan (python main.py plan, from the
# model config alone) and stops if the run would not fit GPU_MEMORY, before any weight is loaded.
#
#   MODEL=/path/to/glm-4-9b-chat-hf TRAIN_FILE=train.jsonl bash scripts/train_lowvram.sh
#   DRY_RUN=1 MODEL=... bash scripts/train_lowvram.sh        # the plan only
#   FORCE=1 ...                                              # train even when the plan says it does not fit
#
# Every setting below can be overridden from the environment; extra arguments go to main.py and win.
# Cards without bf16 (Turing and older: T4, RTX 20xx): DTYPE=fp16.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:?set MODEL to a local model directory or hub id}
TRAIN_FILE=${TRAIN_FILE:-data/demo/train.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-output/lowvram}
GPU_MEMORY=${GPU_MEMORY:-8GB}
QUANT_BIT=${QUANT_BIT:-4}             # 4 (NF4) or 8
QUANT_TYPE=${QUANT_TYPE:-nf4}         # nf4 or fp4
DOUBLE_QUANT=${DOUBLE_QUANT:-true}    # 8-bit absmax: ~0.4 bits a weight less
DTYPE=${DTYPE:-bf16}                  # compute dtype (and that of the unquantized embeddings/LM head)
PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
MAX_SOURCE_LENGTH=${MAX_SOURCE_LENGTH:-64}
MAX_TARGET_LENGTH=${MAX_TARGET_LENGTH:-64}
BATCH_SIZE=${BATCH_SIZE:-1}
GRAD_ACCUM=${GRAD_ACCUM:-16}
LR=${LR:-2e-2}
MAX_STEPS=${MAX_STEPS:-3000}
SAVE_STEPS=${SAVE_STEPS:-500}

args=(
  --model_name_or_path "$MODEL"
  --do_train --train_file "$TRAIN_FILE"
  --output_dir "$OUTPUT_DIR" --overwrite_output_dir
  --quantization_bit "$QUANT_BIT" --quant_type "$QUANT_TYPE" --double_quant "$DOUBLE_QUANT" --torch_dtype "$DTYPE"
  --activation_checkpointing
  --pre_seq_len "$PRE_SEQ_LEN"
  --max_source_length "$MAX_SOURCE_LENGTH" --max_target_length "$MAX_TARGET_LENGTH"
  --per_device_train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --learning_rate "$LR" --max_steps "$MAX_STEPS"
  --logging_steps 10 --save_steps "$SAVE_STEPS" --save_total_limit 2
)

# plan exits 1 when the run does not fit, 2 on a bad flag
fits=0
python main.py plan "${args[@]}" "$@" --gpu_memory "$GPU_MEMORY" || fits=$?
[ "$fits" -le 1 ] || exit "$fits"
if [ -n "${DRY_RUN:-}" ]; then
  exit 0
fi
if [ "$fits" = 1 ] && [ -z "${FORCE:-}" ]; then
  echo "not starting: the plan above does not fit GPU_MEMORY=$GPU_MEMORY (FORCE=1 to try anyway)" >&2
  exit 1
fi
exec python main.py "${args[@]}" "$@"
