#!/usr/bin/env bash
# P-Tuning v2 training. With no arguments: trains a prefix for the bundled SmolLM2-135M-Instruct demo on CPU in
# about a minute and shows greedy generations before and after. Every setting below can be overridden from the
# environment (e.g. MODEL=THUDM/glm-4-9b-chat-hf NUM_GPUS=8 DS_CONFIG=ds_configs/zero2.json bash scripts/train.sh);
# extra arguments are passed to main.py unchanged and win over the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-}                      # local dir or hub id; empty = the bundled demo model
TRAIN_FILE=${TRAIN_FILE:-data/demo/train.jsonl}
TEST_FILE=${TEST_FILE:-data/demo/dev.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-output/demo}
PRE_SEQ_LEN=${PRE_SEQ_LEN:-16}
LR=${LR:-2e-2}
MAX_STEPS=${MAX_STEPS:-60}
BATCH_SIZE=${BATCH_SIZE:-8}
GRAD_ACCUM=${GRAD_ACCUM:-1}
MAX_SOURCE_LENGTH=${MAX_SOURCE_LENGTH:-128}
MAX_TARGET_LENGTH=${MAX_TARGET_LENGTH:-32}
QUANT_BIT=${QUANT_BIT:-}              # 4 or 8 for a bitsandbytes-quantized base
DS_CONFIG=${DS_CONFIG:-}              # e.g. ds_configs/zero2.json
NUM_GPUS=${NUM_GPUS:-1}               # processes per node
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
HOSTFILE=${HOSTFILE:-}                # set to launch with the deepspeed launcher over a hostfile

if [ -z "$MODEL" ]; then
  MODEL=$(python scripts/prepare_model.py)
  [ -f "$TRAIN_FILE" ] || python scripts/make_demo_data.py
fi

args=(
  --model_name_or_path "$MODEL"
  --do_train --train_file "$TRAIN_FILE"
  --do_predict --test_file "$TEST_FILE" --preview_samples 3
  --output_dir "$OUTPUT_DIR" --overwrite_output_dir
  --pre_seq_len "$PRE_SEQ_LEN"
  --learning_rate "$LR" --max_steps "$MAX_STEPS"
  --per_device_train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_source_length "$MAX_SOURCE_LENGTH" --max_target_length "$MAX_TARGET_LENGTH"
  --logging_steps 10 --save_steps "$MAX_STEPS" --save_total_limit 2 --report_to none
)
[ -n "$QUANT_BIT" ] && args+=(--quantization_bit "$QUANT_BIT")
[ -n "$DS_CONFIG" ] && args+=(--deepspeed "$DS_CONFIG")

if [ -n "$HOSTFILE" ]; then
  exec deepspeed --hostfile "$HOSTFILE" --no_local_rank --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    main.py "${args[@]}" "$@"
elif [ "$NUM_GPUS" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
  exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NUM_GPUS" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" main.py "${args[@]}" "$@"
else
  exec python main.py "${args[@]}" "$@"
fi
