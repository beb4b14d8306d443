#!/usr/bin/env bash
# P-Tuning v2 training: one script for a single process, several GPUs and several nodes.
#
# With no arguments: trains a prefix for the bundled SmolLM2-135M-Instruct demo on CPU in about a minute and shows
# greedy generations before and after. Every setting below can be overridden from the environment; extra arguments
# are passed to main.py unchanged and win over the defaults. Examples:
#
#   NUM_GPUS=8 DS_CONFIG=ds_configs/zero2.json MODEL=THUDM/glm-4-9b-chat-hf bash scripts/train.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NUM_GPUS=8 DS_CONFIG=ds_configs/zero3.json MODEL=... bash scripts/train.sh
#   HOSTFILE=hostfile DS_CONFIG=ds_configs/zero3_offload.json MODEL=... bash scripts/train.sh   # deepspeed launcher
#
# Several processes (NUM_GPUS > 1 or NNODES > 1) or a DeepSpeed config launch with torchrun, or with the deepspeed
# launcher when HOSTFILE is set (it reaches the hosts over passwordless ssh) or LAUNCHER=deepspeed (one node);
# afterwards one process predicts TEST_FILE from the exported prefix (on node 0). Without a GPU the processes run on
# the CPU (gloo), so NUM_GPUS=2 DS_CONFIG=ds_configs/zero2.json works on a laptop.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-}                      # local dir or hub id; empty = the bundled demo model
TRAIN_FILE=${TRAIN_FILE:-data/demo/train.jsonl}
TEST_FILE=${TEST_FILE:-data/demo/dev.jsonl}   # empty: no predictions
OUTPUT_DIR=${OUTPUT_DIR:-output/demo}
PRE_SEQ_LEN=${PRE_SEQ_LEN:-16}
LR=${LR:-3e-2}
MAX_STEPS=${MAX_STEPS:-24}
BATCH_SIZE=${BATCH_SIZE:-8}           # per process; the global batch is BATCH_SIZE x GRAD_ACCUM x processes
GRAD_ACCUM=${GRAD_ACCUM:-1}
MAX_SOURCE_LENGTH=${MAX_SOURCE_LENGTH:-128}
MAX_TARGET_LENGTH=${MAX_TARGET_LENGTH:-32}
QUANT_BIT=${QUANT_BIT:-}              # 4 or 8 for a bitsandbytes-quantized base
PRECISION=${PRECISION:-auto}          # bf16, fp16 or fp32; auto: bf16 (fp16 on GPUs without it) on GPU, fp32 on CPU
DS_CONFIG=${DS_CONFIG:-}              # ds_configs/zero2.json, zero3.json or zero3_offload.json
NUM_GPUS=${NUM_GPUS:-}                # processes per node; default: the GPUs present (1 on a CPU-only machine)
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
HOSTFILE=${HOSTFILE:-}                # set to launch with the deepspeed launcher over this hostfile
LAUNCHER=${LAUNCHER:-torchrun}        # torchrun or deepspeed (implied by HOSTFILE)
PREDICT=${PREDICT:-1}                 # 0: skip predicting TEST_FILE
DRY_RUN=${DRY_RUN:-0}

run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# GPUs present, and the precision they support (the last line only: an import may print before it)
read -r GPUS BF16_OK < <(python -c "import torch; n = torch.cuda.device_count(); \
print(n, int(n > 0 and torch.cuda.is_bf16_supported()))" 2>/dev/null | tail -n 1 || echo "0 0")
[[ "$GPUS" =~ ^[0-9]+$ ]] || { GPUS=0; BF16_OK=0; }
NUM_GPUS=${NUM_GPUS:-$(( GPUS > 0 ? GPUS : 1 ))}
if [ "$PRECISION" = auto ]; then
  if [ "$GPUS" -eq 0 ]; then PRECISION=fp32; elif [ "$BF16_OK" = 1 ]; then PRECISION=bf16; else PRECISION=fp16; fi
fi

if [ -z "$MODEL" ]; then
  # The bundled demo model, converted once into a fixed directory (nothing is read back from a program's stdout).
  MODEL=.cache/smollm2-135m-instruct
  if [ "$DRY_RUN" != 1 ]; then
    python scripts/prepare_model.py --out "$MODEL" >/dev/null
    [ -f "$TRAIN_FILE" ] || python scripts/make_demo_data.py
  fi
fi

common=(--model_name_or_path "$MODEL" --max_source_length "$MAX_SOURCE_LENGTH")
[ -n "$QUANT_BIT" ] && common+=(--quantization_bit "$QUANT_BIT")
[ "$GPUS" -eq 0 ] && common+=(--use_cpu)
args=(
  "${common[@]}"
  --do_train --train_file "$TRAIN_FILE"
  --output_dir "$OUTPUT_DIR" --overwrite_output_dir
  --pre_seq_len "$PRE_SEQ_LEN"
  --learning_rate "$LR" --max_steps "$MAX_STEPS"
  --per_device_train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --max_target_length "$MAX_TARGET_LENGTH"
  --logging_steps 5 --save_steps "$MAX_STEPS" --save_total_limit 2 --report_to none
)
case "$PRECISION" in
  bf16) args+=(--bf16) ;;
  fp16) [ "$GPUS" -eq 0 ] && { echo "error: PRECISION=fp16 needs a GPU (use bf16 or fp32 on CPU)" >&2; exit 2; }
        args+=(--fp16) ;;
  fp32) ;;
  *) echo "error: PRECISION=$PRECISION: expected auto, bf16, fp16 or fp32" >&2; exit 2 ;;
esac
[ -n "$DS_CONFIG" ] && args+=(--deepspeed "$DS_CONFIG")

[ -n "$HOSTFILE" ] && LAUNCHER=deepspeed
if [ "$LAUNCHER" != torchrun ] && [ "$LAUNCHER" != deepspeed ]; then
  echo "error: LAUNCHER=$LAUNCHER: expected torchrun or deepspeed" >&2; exit 2
fi
if [ "$LAUNCHER" = torchrun ] && [ "$NUM_GPUS" -le 1 ] && [ "$NNODES" -le 1 ] && [ -z "$DS_CONFIG" ]; then
  # One process: train, then predict in the same run (greedy generations before/after training are printed too).
  [ -n "$TEST_FILE" ] && [ "$PREDICT" != 0 ] && args+=(--do_predict --test_file "$TEST_FILE" --preview_samples 3 --max_new_tokens 24)
  run python main.py "${args[@]}" "$@"
  exit
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per process unless told otherwise
if [ "$LAUNCHER" = deepspeed ]; then
  # --no_local_rank: main.py reads LOCAL_RANK from the environment, like under torchrun
  launcher=(deepspeed --no_local_rank --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  if [ -n "$HOSTFILE" ]; then
    launcher+=(--hostfile "$HOSTFILE")          # processes per host: its slots
    [ "$NNODES" -gt 1 ] && launcher+=(--num_nodes "$NNODES")
  else
    launcher+=(--num_gpus "$NUM_GPUS")
  fi
  run "${launcher[@]}" main.py "${args[@]}" "$@"
else
  run torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NUM_GPUS" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" main.py "${args[@]}" "$@"
fi

# Predict from the exported prefix in one process (ZeRO-3 keeps the base partitioned, so the training processes
# do not generate).
if [ -n "$TEST_FILE" ] && [ "$PREDICT" != 0 ] && [ "$NODE_RANK" = 0 ]; then
  run python main.py "${common[@]}" --ptuning_checkpoint "$OUTPUT_DIR" --do_predict --test_file "$TEST_FILE" \
    --output_dir "$OUTPUT_DIR"
fi
