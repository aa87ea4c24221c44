#!/usr/bin/env bash
# The whole pipeline on the built-in tiny model and medical dataset: PT -> SFT -> RM -> PPO,
# merging each LoRA adapter (SFT, PPO) into its base, as in the MedicalGPT tutorials. CPU: about 6 minutes.
#   bash scripts/demo.sh [OUT_DIR]        (make demo runs it into runs/demo)
set -euo pipefail
# A ~1M-parameter model gains nothing from more threads, and on shared cores two threads were
# measured ~10x slower than one. Set OMP_NUM_THREADS yourself to override.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${1:-runs/demo}
PY=${PYTHON:-python3}
D=data/demo
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s so far) =="; }

step "1/4 PT: build a tokenizer + tiny model from the corpus, pretrain it (full)"
$PY train_pt.py --data $D/pt.txt --output_dir "$OUT/pt" --num_train_epochs 12 \
    --per_device_train_batch_size 16 --learning_rate 3e-3 --logging_steps 20

step "2/4 SFT: LoRA on the pretrained model, answers in the demo's short style; merge"
$PY train_sft.py --model "$OUT/pt" --data $D/sft.jsonl,$D/sft_alpaca.jsonl --output_dir "$OUT/sft" \
    --num_train_epochs 4 --per_device_train_batch_size 16 --learning_rate 3e-3 --lora_rank 32 --lora_alpha 64 \
    --logging_steps 20
$PY merge_lora.py --base "$OUT/pt" --adapter "$OUT/sft" --output_dir "$OUT/sft-merged"

step "3/4 RM: a reward model from the SFT model on preference pairs (full fine-tuning)"
# Full, not LoRA: on a 1M-parameter model the adapters' extra small matmuls cost more than they save,
# and the RM must tell a right diagnosis from a wrong one, which LoRA learned more slowly here.
# With a real model (Qwen2.5-0.5B) use --finetuning_type lora and merge_lora.py as in stage 2.
$PY train_rm.py --model "$OUT/sft-merged" --data $D/rm.jsonl --eval_data $D/rm_test.jsonl --output_dir "$OUT/rm-merged" \
    --finetuning_type full --num_train_epochs 2 --per_device_train_batch_size 16 --learning_rate 3e-4 \
    --weight_decay 0.1 --logging_steps 20 --eval_steps 100

step "4/4 PPO: the SFT policy against the reward model; merge"
source scripts/demo_ppo_flags.sh  # PPO_FLAGS: room to end, the missing-EOS penalty, ... (why: in that file)
$PY train_ppo.py --sft "$OUT/sft-merged" --rm "$OUT/rm-merged" --data $D/ppo.jsonl --output_dir "$OUT/ppo" \
    "${PPO_FLAGS[@]}"
$PY merge_lora.py --base "$OUT/sft-merged" --adapter "$OUT/ppo" --output_dir "$OUT/ppo-merged"

step "Held-out prompts: SFT vs PPO (same prompts, greedy, room to end: 256 new tokens)"
$PY -m nanorlhf.evaluate sft="$OUT/sft-merged" ppo="$OUT/ppo-merged" --rm "$OUT/rm-merged" \
    --data $D/test.jsonl --output_dir "$OUT/eval"
# What to open: the figures (drawn where matplotlib is installed, as make demo does), the table, the answers
figure() { if [ -f "$2" ]; then echo "  $1: $2"; else echo "  $1: not drawn, no matplotlib (pip install -e \".[plot]\")"; fi; }
echo
echo "done in $(( $(date +%s) - start )) s; outputs in $OUT/. Open:"
figure "PPO's learning curves (score, KL, entropy, length per iteration)" "$OUT/ppo/curves.png"
figure "SFT vs PPO on the held-out prompts (the table above, drawn)" "$OUT/eval/results.png"
echo "  the table and every answer: $OUT/eval/results.md, $OUT/eval/predictions.jsonl"
echo "  one PPO iteration, every number per token:"
echo "    $PY -m nanorlhf.trace --sft $OUT/sft-merged --rm $OUT/rm-merged --data $D/ppo.jsonl \\"
echo "        --response_length 96 --missing_eos_penalty 5 --clamp_stop_advantage --plot $OUT/trace.png"
