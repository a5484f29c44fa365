#!/usr/bin/env bash
# Muon vs AdamW at equal steps on the demo model: 2 optimizers x 4 peak lrs x 2 seeds, 300 steps each, 2 runs at a
# time (one thread each). Writes runs under $OUT (default /tmp/muon_vs_adamw) and results.json next to this script.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-/tmp/muon_vs_adamw}"
jobs=()
for lr in 1e-3 3e-3 1e-2 3e-2; do
  for seed in 0 1; do
    for recipe in shakespeare_muon_llama shakespeare_adamw_llama; do
      jobs+=("$recipe $lr $seed")
    done
  done
done
run() {
  set -- $1
  local dir="$out/$1-lr$2-seed$3"
  [ -f "$dir/metrics.json" ] && return 0   # resumable: finished runs are kept
  hf-optim train "$1" optimizer.lr="$2" run.seed="$3" run.save_steps=1000 --output-dir "$dir" > "$dir.log" 2>&1
  echo "done $1 lr=$2 seed=$3"
}
export -f run
export out
mkdir -p "$out"
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c 'run "{}"'
python - "$out" "$here/results.json" <<'PY'
import json, re, sys
from pathlib import Path

rows = []
for path in sorted(Path(sys.argv[1]).glob("*/metrics.json")):
    recipe, lr, seed = re.fullmatch(r"(.+)-lr(.+)-seed(\d+)", path.parent.name).groups()
    summary = json.loads(path.read_text())["summary"]
    rows.append({"recipe": recipe, "lr": float(lr), "seed": int(seed),
                 "final_eval_loss": summary["final_eval_loss"], "steps": summary["steps"]})
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1) + "\n")
print(f"{len(rows)} runs -> {sys.argv[2]}")
PY
