#!/usr/bin/env bash
# Loss parity of stored optimizer state (issue 26): the AdamW and Adafactor demo recipes, 3 seeds, every state_dtype.
# Usage: [DTYPES="int8 int4"] bash docs/experiments/state_dtype/run.sh [WORK_DIR]
#   (about 25 minutes on 2 cores for all four dtypes; finished runs are kept)
# Writes results.jsonl next to this script: one line per run (final validation loss, optimizer state bytes); rows of
# dtypes not run this time are kept from the existing file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/hf_optim_state_dtype}"
mkdir -p "$work"
jobs=()
for recipe in demo/shakespeare_adamw_llama demo/shakespeare_mup_llama_adafactor; do
  for dtype in ${DTYPES:-float32 bfloat16 int8 int4}; do
    for seed in 0 1 2; do
      jobs+=("$recipe $dtype $seed")
    done
  done
done
run_one() {
  set -euo pipefail
  read -r recipe dtype seed <<<"$1"
  out="$2/$(basename "$recipe")-$dtype-s$seed"
  [ -f "$out/metrics.json" ] && return 0
  hf-optim train "$recipe" "optimizer.args.state_dtype=$dtype" "run.seed=$seed" "run.save_steps=300" \
    --output-dir "$out" >"$out.log" 2>&1
  echo "done: $recipe $dtype seed $seed"
}
export -f run_one
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c 'run_one "$@"' _ {} "$work"
python - "$work" "$here/results.jsonl" <<'PY'
import json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows, ran = [], set()
for run in sorted(p for p in work.iterdir() if (p / "metrics.json").exists()):
    recipe, dtype, seed = run.name.rsplit("-", 2)
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    checkpoint = sorted(run.glob("checkpoint-*"))[-1]
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    params = sum(t.numel() for t in load_file(checkpoint / "model.safetensors").values())
    state_bytes = sum(t.numel() * t.element_size() for s in state.values() for k, t in s.items() if k != "step")
    rows.append({"recipe": recipe, "state_dtype": dtype, "seed": int(seed[1:]), "val_loss": summary["final_eval_loss"],
                 "seconds": summary.get("seconds"), "state_bytes": state_bytes, "params": params})
    ran.add((recipe, dtype))
if out.exists():  # rows of (recipe, dtype) pairs not run this time stay as they were
    kept = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    rows = [r for r in kept if (r["recipe"], r["state_dtype"]) not in ran] + rows
rows.sort(key=lambda r: (r["recipe"], ["float32", "bfloat16", "int8", "int4"].index(r["state_dtype"]), r["seed"]))
out.write_text("".join(json.dumps(r) + "\n" for r in rows))
print(f"wrote {len(rows)} rows to {out}")
PY
