#!/bin/bash
# Issue 17's open question (docs/benchmarks.md, "FLUX.1-dev on an 80 GB card"): at 1024 px, b4m content with the
# default settings trains under a 78 GiB cap, but bench/flux_speed.py's step of the same shapes runs out of memory
# with every plan. One device call (about 4 minutes on an H100 or H200; the cap makes either an 80 GB card):
#
#   source bench/gpu_setup.sh >/dev/null && bash bench/flux_80gb.sh      # carry .whl
#
# Writes to $OUT: the bench's row (with, per failed plan, the phase it ran out in, the error and the frames:
# out_of_memory_errors), the user's command's report (with the plan it trained with: speed) and its run.json.
set -u
OUT=${OUT:-runs/out}; CAP=${CAP:-78}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt"
# the bench's row alone, in a fresh process, under the same cap as the command below
timeout 190 python -c "import sys, torch, runpy
torch.cuda.set_per_process_memory_fraction(min(1.0, $CAP * 2**30 / torch.cuda.get_device_properties(0).total_memory))
sys.argv = ['bench/flux_speed.py'] + sys.argv[1:]
runpy.run_path('bench/flux_speed.py', run_name='__main__')" --family flux --rows b4m/default/1024 --repeats 2 \
  --json "$OUT/flux-default-1024-cap$CAP.json" > "$OUT/flux-speed.log" 2>&1
# the user's command: b4m content at 1024 px with no preset (speed auto), 2 steps
timeout 200 python bench/flux_pipeline.py --out runs/flux-bench --cap-gib "$CAP" --preset none --stages content \
  --steps 2 > "$OUT/flux-pipeline.log" 2>&1
cp runs/flux-bench/dog/run.json "$OUT/content-run.json" 2>/dev/null
python3 - "$OUT" "$CAP" <<'EOF'
import json, sys
from pathlib import Path
out, cap = Path(sys.argv[1]), sys.argv[2]
row = json.loads((out / f"flux-default-1024-cap{cap}.json").read_text())["rows"][0]
print("bench:", row.get("plan") or row.get("error"))
for label, err in zip(row.get("out_of_memory", []), row.get("out_of_memory_errors", [])):
    print(f"  {label}: {err['phase']}: {err['message'][:160]} at {err['where'][-1]}")
report = out / "flux_pipeline.json"
if report.exists():
    content = json.loads(report.read_text())["stages"].get("content", {})
    print("command:", "finished" if content.get("finished") else content.get("error"), content.get("speed"),
          content.get("peak"))
EOF
