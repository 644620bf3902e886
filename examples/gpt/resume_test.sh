#!/usr/bin/env bash
# The GPT's restart test: an uninterrupted run, then the same run whose last
# rank kills itself before step 19 under torchrun --max-restarts 1. The
# restarted attempt resumes after the newest checkpoint (step 15) and its
# curve must equal the uninterrupted run's, step for step.
# Arguments: the folder that holds the wheel's torch package, the gpt
# program, a scratch folder.
set -u
python_path=$1 gpt=$2 scratch=$3
PYTHONPATH="$python_path" python3 -c 'import torch.distributed.run' 2>/dev/null ||
  { echo "SKIP: python3 cannot import torch from $python_path"; exit 77; }
rm -rf "$scratch" && mkdir -p "$scratch"
run() { # folder, extra flags...
  local folder=$1; shift
  PYTHONPATH="$python_path" OMP_NUM_THREADS=1 python3 -m torch.distributed.run \
    --standalone --nproc-per-node 2 --max-restarts 1 --no-python "$gpt" \
    --distributed 1 --steps 24 --every 8 --layers 2 --width 32 --context 32 \
    --batch 8 --microbatches 2 --sample 0 --compare 0 --checkpoint-every 8 \
    --checkpoint-dir "$scratch/$folder/checkpoints" --output "$scratch/$folder" "$@"
}
run whole || { echo "FAIL: the uninterrupted run failed"; exit 1; }
run resumed --kill-at-step 19 || { echo "FAIL: the restarted run failed"; exit 1; }
python3 - "$scratch/whole/gpt_curve.csv" "$scratch/resumed/gpt_curve.csv" <<'PY'
import csv, sys
whole = {int(r["step"]): float(r["pipe"]) for r in csv.DictReader(open(sys.argv[1]))}
resumed = {int(r["step"]): float(r["pipe"]) for r in csv.DictReader(open(sys.argv[2]))}
steps = sorted(resumed)
assert steps == list(range(16, 24)), f"FAIL: the restart resumed at steps {steps}, not 16..23"
for s in steps:
    w, r = whole[s], resumed[s]
    assert abs(w - r) <= 1e-6 * abs(w), f"FAIL: step {s}: {r} resumed, {w} uninterrupted"
    print(f"step {s}: {r:.6f} resumed, {w:.6f} uninterrupted")
print("the resumed curve continues the uninterrupted one")
PY
