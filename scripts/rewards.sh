#!/usr/bin/env bash
# Rewards a program computes, on the demo (run `make demo` first): writes into OUT (default runs/rewards)
#   1. GRPO with a rule reward (MedicalGPT's recipe): data/demo/grpo.jsonl's {"question", "answer"}, where the
#      answer is the fact a full answer holds about when to see a doctor; nanorlhf.rewards:accuracy checks it.
#   2. PPO and GRPO trained on the gold rubric itself (nanorlhf.rewards:gold), beside the demo's PPO trained on
#      the reward model, all judged on the held-out prompts: how much of the RM's gain is real.
#   bash scripts/rewards.sh [DEMO_DIR] [OUT_DIR]        (make rewards)
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread: the same numbers run after run (see demo.sh)
DEMO=${1:-runs/demo}
OUT=${2:-runs/rewards}
PY=${PYTHON:-python3}
D=data/demo
for model in sft-merged rm-merged ppo-merged; do
    [ -d "$DEMO/$model" ] || { echo "error: $DEMO/$model: run make demo first" >&2; exit 2; }
done
rm -rf "$OUT"
start=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - start )) s so far) =="; }

step "1/3 GRPO with a rule reward: accuracy on data/demo/grpo.jsonl, no reward model"
$PY train_ppo.py --sft "$DEMO/sft-merged" --reward_fn nanorlhf.rewards:accuracy --data $D/grpo.jsonl \
    --advantage_estimator grpo --num_samples_per_prompt 8 --batch_size 32 --num_updates 20 --learning_rate 1e-3 \
    --response_length 96 --logging_steps 1 --output_dir "$OUT/grpo-rules"
$PY -m nanorlhf.plots "$OUT/grpo-rules" --keys objective/fn_scores,objective/kl,val/response_length \
    -o "$OUT/grpo-rules/rule_reward.png"

# The demo's PPO flags as docs/rewards.md measured them (before the demo added --clamp_stop_advantage); the rubric is in [0, 1], so x10 puts it on the scale of the RM's scores (SFT -8, PPO +3).
GOLD=(--reward_fn nanorlhf.rewards:gold --reward_fn_weight 10 --data $D/ppo.jsonl --num_updates 20 --batch_size 16
      --learning_rate 3e-4 --logging_steps 1 --response_length 96 --missing_eos_penalty 5)
step "2/3 PPO and GRPO on the gold rubric (the demo's flags), merged"
$PY train_ppo.py --sft "$DEMO/sft-merged" "${GOLD[@]}" --output_dir "$OUT/ppo-gold"
$PY train_ppo.py --sft "$DEMO/sft-merged" "${GOLD[@]}" --advantage_estimator grpo --num_samples_per_prompt 4 \
    --output_dir "$OUT/grpo-gold"
for run in ppo-gold grpo-gold; do
    $PY merge_lora.py --base "$DEMO/sft-merged" --adapter "$OUT/$run" --output_dir "$OUT/$run-merged"
done

step "3/3 Held-out prompts: SFT, PPO on the reward model, PPO and GRPO on the rubric"
$PY -m nanorlhf.evaluate sft="$DEMO/sft-merged" ppo_rm="$DEMO/ppo-merged" ppo_gold="$OUT/ppo-gold-merged" \
    grpo_gold="$OUT/grpo-gold-merged" --rm "$DEMO/rm-merged" --data $D/test.jsonl --output_dir "$OUT/eval"
echo
echo "done in $(( $(date +%s) - start )) s; outputs in $OUT/ (grpo-rules/rule_reward.png, eval/results.md)"
