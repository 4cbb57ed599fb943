#!/usr/bin/env bash
# The paper's main table in miniature: every setup x 3 seeds on the built-in tiny base and mixture,
# then one comparison table (mean ± sd over seeds). Two runs at a time, one thread each.
#   bash table.sh                 # writes runs/table/<setup>-s<seed>/ and runs/table/table.txt
#   STEPS=300 EVAL_LIMIT=200 bash table.sh   # shorter: 300 steps, 200 test examples per task
# By default every run is the quick start's (400 steps of the tiny preset, the whole test split).
set -euo pipefail
cd "$(dirname "$0")"
STEPS=${STEPS:-400}
EVAL_LIMIT=${EVAL_LIMIT:-}
OUT=runs/table
COMMON="--max-steps $STEPS ${EVAL_LIMIT:+--eval-limit $EVAL_LIMIT}"
declare -A SETUPS=(
  [lora-r8]="--method lora --rank 8"
  [lora-r32]="--method lora --rank 32"
  [moelora]="--method moelora --experts 4 --rank 8"
  [hydralora]="--method hydralora --experts 4 --rank 8"
  [teamlora]="--method teamlora --experts 4 --rank 8"
  [teamlora-r4]="--method teamlora --experts 4 --rank 4"
  [collab-only]="--method teamlora --experts 4 --rank 8 --router softmax"
  [compete-only]="--method moelora --experts 4 --rank 8 --router shapley"
)
ORDER="lora-r8 lora-r32 moelora hydralora teamlora teamlora-r4 collab-only compete-only"
python train.py --method lora --max-steps 1 --no-eval --out "$OUT/warmup" > /dev/null  # builds the tiny base once
jobs_list=()
for seed in 0 1 2; do
  for name in $ORDER; do
    jobs_list+=("$name $seed")
  done
done
run_one() {
  local name=$1 seed=$2 dir="$OUT/$1-s$2"
  [ -f "$dir/eval.json" ] && return 0  # done already: rerunning the script resumes the table
  OMP_NUM_THREADS=1 python train.py ${SETUPS[$name]} --seed "$seed" $COMMON --out "$dir" > "$dir.log" 2>&1
  echo "done $dir: $(python -c "import json; print(round(json.load(open('$dir/eval.json'))['average'], 3))")"
}
mkdir -p "$OUT"
running=0
for job in "${jobs_list[@]}"; do
  run_one $job &
  running=$((running + 1))
  if [ "$running" -ge 2 ]; then wait -n; running=$((running - 1)); fi
done
wait
dirs=()
for name in $ORDER; do for seed in 0 1 2; do dirs+=("$OUT/$name-s$seed"); done; done
python eval.py --compare "${dirs[@]}" | tee "$OUT/table.txt"
