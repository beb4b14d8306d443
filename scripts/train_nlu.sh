#!/usr/bin/env bash
# P-Tuning v2 for understanding tasks. With no arguments: builds the tiny demo BERT and data once
# (scripts/make_nlu_demo.py), prefix-tunes it for 3-class review classification on CPU in under a minute, and
# prints dev accuracy/macro-F1 before and after training. TASK=token_cls (BIO entities) or TASK=qa (extractive QA)
# runs the other demos. Every setting below can be overridden from the environment, e.g.
#   MODEL=bert-base-chinese TRAIN_FILE=train.json DEV_FILE=dev.json PRE_SEQ_LEN=128 LR=5e-3 bash scripts/train_nlu.sh
# and extra arguments are passed to main.py unchanged and win over the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

TASK=${TASK:-seq_cls}                 # seq_cls | token_cls | qa
MODEL=${MODEL:-}                      # local dir or hub id (BERT/RoBERTa/ELECTRA); empty = the tiny demo BERT
case "$TASK" in
  seq_cls) demo=cls ;;
  token_cls) demo=ner ;;
  qa) demo=qa ;;
  *) echo "TASK must be seq_cls, token_cls or qa, got '$TASK'" >&2; exit 2 ;;
esac
TRAIN_FILE=${TRAIN_FILE:-data/nlu_demo/${demo}_train.jsonl}
DEV_FILE=${DEV_FILE:-data/nlu_demo/${demo}_dev.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-output/nlu-demo-$TASK}
PRE_SEQ_LEN=${PRE_SEQ_LEN:-16}
LR=${LR:-3e-2}
EPOCHS=${EPOCHS:-12}
SCHEDULER=${SCHEDULER:-constant}      # the tiny random encoder learns best at a constant rate without clipping
MAX_GRAD_NORM=${MAX_GRAD_NORM:-0}
BATCH_SIZE=${BATCH_SIZE:-32}
MAX_LENGTH=${MAX_LENGTH:-64}

if [ -z "$MODEL" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a 2-layer, 128-wide model runs fastest on one thread
  MODEL=.cache/nlu-demo-bert
  if [ ! -f "$MODEL/config.json" ] || [ ! -f "$TRAIN_FILE" ]; then
    python scripts/make_nlu_demo.py --model "$MODEL" >/dev/null
  fi
fi

exec python main.py --task_type "$TASK" --model_name_or_path "$MODEL" \
  --do_train --train_file "$TRAIN_FILE" \
  --do_eval --validation_file "$DEV_FILE" \
  --do_predict --test_file "$DEV_FILE" \
  --output_dir "$OUTPUT_DIR" --overwrite_output_dir \
  --pre_seq_len "$PRE_SEQ_LEN" --learning_rate "$LR" --num_train_epochs "$EPOCHS" \
  --lr_scheduler_type "$SCHEDULER" --max_grad_norm "$MAX_GRAD_NORM" \
  --per_device_train_batch_size "$BATCH_SIZE" --per_device_eval_batch_size 64 \
  --max_source_length "$MAX_LENGTH" --doc_stride 16 \
  --logging_steps 20 --save_strategy epoch --save_total_limit 1 --report_to none --seed 0 "$@"
