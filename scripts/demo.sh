#!/usr/bin/env bash
# The main job on the built-in default: synthetic clips → train a small model → export to ONNX →
# predict with ONNX Runtime → caption metrics. Usage: bash scripts/demo.sh [WORK_DIR]
set -euo pipefail
WORK=${1:-v2t-demo}
export HF_HUB_OFFLINE=1

v2t synth "$WORK/data" --train 2000 --val 200 --test 200

v2t train --tables "$WORK/data/train.txt,$WORK/data/val.txt" --checkpoint_dir "$WORK/ck" \
  --input_schema idx:str:1,imgbase64:str:1,text:str:1 --first_sequence imgbase64 --second_sequence text \
  --micro_batch_size 32 --epoch_num 20 --learning_rate 1e-3 --random_seed 42 \
  --user_defined_parameters 'frame_num=4 img_size=64 text_len=16 n_layer=2 n_head=4 n_embd=128
      vit_width=128 vit_layers=2 vit_heads=4 vit_patch_size=16'

v2t export --checkpoint_dir "$WORK/ck" --format onnx --output "$WORK/onnx"

v2t predict --tables "$WORK/data/test.txt" --outputs "$WORK/test_out.txt" --checkpoint_dir "$WORK/onnx" \
  --input_schema idx:str:1,imgbase64:str:1 --first_sequence imgbase64 --micro_batch_size 32

v2t eval --predictions "$WORK/test_out.txt" --references "$WORK/data/test_refs.txt"
