#!/usr/bin/env bash
# The demo's PPO stage (scripts/demo.sh, stage 4) rerun from the same SFT and reward models on several
# seeds and thread counts, then every policy judged on the held-out prompts in one evaluate call.
# Float results differ between machines (AMD EPYC, Intel with AMX, ...) and between thread counts;
# seeds and threads stand in for the machines we cannot try, so the README quotes the range over them.
#   bash scripts/demo_seeds.sh [DEMO_DIR] [OUT_DIR]      (make demo-seeds; make demo first)
#   SEEDS="1 2 3 4 5 42" THREADS="1 2" JOBS=2 PPO_EXTRA="--num_updates 30": what runs (JOBS runs side by side, each with its own threads)
set -euo pipefail
DEMO=${1:-runs/demo}
OUT=${2:-runs/demo-seeds}
SEEDS=${SEEDS:-1 2 3 4 5 42}
THREADS=${THREADS:-1 2}
JOBS=${JOBS:-1}
PPO_EXTRA=${PPO_EXTRA:-}  # flags added after the demo's own (the last value of a flag wins)
PY=${PYTHON:-python3}
D=data/demo
source scripts/demo_ppo_flags.sh  # PPO_FLAGS: the demo's own PPO settings
for f in "$DEMO/sft-merged" "$DEMO/rm-merged"; do
    [ -d "$f" ] || { echo "error: $f not found: run make demo first" >&2; exit 2; }
done
mkdir -p "$OUT"
start=$(date +%s)

one_run() {  # seed threads
    local name="seed$1_threads$2" log="$OUT/seed$1_threads$2.log"
    if [ -f "$OUT/$name-merged/config.json" ]; then echo "$name: kept from an earlier run"; return; fi
    rm -rf "$OUT/$name" "$OUT/$name-merged"
    OMP_NUM_THREADS=$2 $PY train_ppo.py --sft "$DEMO/sft-merged" --rm "$DEMO/rm-merged" --data $D/ppo.jsonl \
        --output_dir "$OUT/$name" "${PPO_FLAGS[@]}" $PPO_EXTRA --seed "$1" > "$log" 2>&1 &&
    if [ -f "$OUT/$name/adapter_config.json" ]; then  # LoRA: merge; a full run (--finetuning_type full) is a model
        OMP_NUM_THREADS=$2 $PY merge_lora.py --base "$DEMO/sft-merged" --adapter "$OUT/$name" \
            --output_dir "$OUT/$name-merged" >> "$log" 2>&1
    else
        cp -r "$OUT/$name" "$OUT/$name-merged"
    fi ||
        { echo "$name failed: see $log" >&2; return 1; }
    echo "$name done ($(( $(date +%s) - start )) s so far)"
}

models=()
for t in $THREADS; do
    for s in $SEEDS; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
        one_run "$s" "$t" &
        models+=("seed${s}_threads${t}=$OUT/seed${s}_threads${t}-merged")
    done
done
wait

echo "== evaluate: SFT and every run, greedy, 256 new tokens =="
OMP_NUM_THREADS=1 $PY -m nanorlhf.evaluate sft="$DEMO/sft-merged" "${models[@]}" --rm "$DEMO/rm-merged" \
    --data $D/test.jsonl --output_dir "$OUT/eval" > "$OUT/eval.log" 2>&1 || { cat "$OUT/eval.log"; exit 1; }
$PY - "$OUT/eval/results.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
rows = rows if isinstance(rows, list) else rows["results"]
sft, runs = rows[0], rows[1:]
print(f"{'model':20s} {'gold':>6s} {'gain':>6s} {'ended':>6s} {'no_rep':>6s} {'length':>6s} {'KL':>6s}")
kl = next(k for k in sft if k.startswith("kl_to_"))
for r in rows:
    print(f"{r['model']:20s} {r['gold']:6.3f} {r['gold'] - sft['gold']:+6.3f} {r['ended']:6.3f} {r['no_repeat']:6.3f} "
          f"{r['response_length']:6.1f} {r[kl]:6.2f}")
for key in ("gold", "ended", "no_repeat", "response_length", kl):
    vals = [r[key] for r in runs]
    print(f"range over {len(runs)} runs, {key}: {min(vals):.3f} .. {max(vals):.3f}")
bad = [r["model"] for r in runs if r["ended"] < 0.95 or r["no_repeat"] < 0.95 or r["gold"] - sft["gold"] < 0.08]
print("every run ends >= 0.95, no_repeat >= 0.95, gold >= SFT + 0.08" if not bad else "below the bar: " + ", ".join(bad))
PY
echo "done in $(( $(date +%s) - start )) s; table in $OUT/eval/results.md"
