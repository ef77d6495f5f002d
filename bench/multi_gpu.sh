#!/bin/bash
# Issue 7's measurements on 2 GPUs, one part per command (each under 10 minutes): measure.sh 1 | 2a | 2b | 3 | report
# Knobs: STEPS (content/style runs, default 500), DP_STEPS (default 300), BENCH (default: 2 contents x 2 styles).
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # KINDS.md: multicast stays off
B4M=${B4M:-"python3 -m b4m.cli"}   # or: b4m
STEPS=${STEPS:-500}; DP_STEPS=${DP_STEPS:-300}; BENCH=${BENCH:-"--contents dog,butterfly --styles vortex,brick"}
# M_DIR: the working folder (default runs/m); `report` can run anywhere on a copy of it (see save_out below).
M_DIR=${M_DIR:-runs/m}
mkdir -p "$M_DIR" && cd "$M_DIR"
# Each part ends by copying what `report` reads into $OUT/m when $OUT is set (the device tool's output folder): a
# machine handed back between calls loses runs/m, so fetch after every part and run `report` on the copy.
save_out() {
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT/m"
    cp times.txt ./*.log "$OUT/m/" 2>/dev/null || true
    for f in bench1/results.json bench2/results.json dp1/run.json dp2/run.json dp1/content.b4m.safetensors \
             dp2/content.b4m.safetensors sweep/summary.json; do
        [ -f "$f" ] && mkdir -p "$OUT/m/$(dirname "$f")" && cp "$f" "$OUT/m/$f"
    done
    return 0
}
trap save_out EXIT
[ -d data ] || [ "$1" = report ] || python3 - <<'PY'
from pathlib import Path
from b4m.world.catalog import default_catalog
from b4m.world.tasks import make_task
t = make_task(default_catalog(), "teapot", "sunburst", 32)
parts = {"content": [t.content_refs], "style": [t.style_refs], "content_aux": t.content_aux, "style_aux": t.style_aux}
for name, sets in parts.items():
    for s in sets:
        d = Path("data", name, s.name if name.endswith("aux") else "")
        d.mkdir(parents=True, exist_ok=True)
        for i, (im, cap) in enumerate(zip(s.images, s.captions)):
            im.save(d / f"{i}.png")
            (d / f"{i}.txt").write_text(cap)
PY
timed() { local t0; t0=$(date +%s.%N); "${@:2}" > "$1.log" 2>&1; python3 -c "print(f'$1 {$(date +%s.%N) - $t0:.1f}')" >> times.txt; }
A="--steps $STEPS --batch-size 2 --grad-accum 1 --lr 2e-3 --rank 16"
C="content --images data/content --prompt sks --aux data/content_aux $A"
S="style --images data/style --prompt zwx --aux data/style_aux $A"
D="content --images data/content --prompt sks --aux data/content_aux --steps $DP_STEPS --batch-size 4 --grad-accum 1 --lr 2e-3 --rank 16"
case "$1" in
1)  # content and style one after the other on one GPU, then at once (b4m sweep: one job per GPU)
    printf '[[jobs]]\nname = "content"\nargv = [%s"-o", "par-content"]\n' "$(printf '"%s", ' $C)" > jobs.toml
    printf '[[jobs]]\nname = "style"\nargv = [%s"-o", "par-style"]\n' "$(printf '"%s", ' $S)" >> jobs.toml
    timed sequential bash -c "CUDA_VISIBLE_DEVICES=0 $B4M $C -o seq-content && CUDA_VISIBLE_DEVICES=0 $B4M $S -o seq-style"
    timed parallel $B4M sweep jobs.toml -o sweep ;;
2a) timed bench-1gpu env CUDA_VISIBLE_DEVICES=0 $B4M bench $BENCH -o bench1 ;;   # today's path: one process
2b) timed bench-2gpu $B4M bench $BENCH -o bench2 ;;                              # the runner: one worker per GPU
3)  timed dp-1gpu env CUDA_VISIBLE_DEVICES=0 $B4M $D -o dp1
    timed dp-2gpu accelerate launch --multi_gpu --num_processes 2 -m b4m.cli $D -o dp2 ;;
report)
    cat times.txt; nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -2 || true
    python3 - <<'PY'
import json, os
from b4m.adapter.file import load_adapter
t = dict(line.split() for line in open("times.txt"))
t = {k: float(v) for k, v in t.items()}
for a, b, what in (("sequential", "parallel", "1. content + style runs"), ("bench-1gpu", "bench-2gpu", "2. bench")):
    if a in t and b in t:
        print(f"{what}: {t[a]:.1f} s vs {t[b]:.1f} s, speed-up {t[a] / t[b]:.2f}x")
if os.path.exists("bench2/results.json"):
    b1, b2 = (json.load(open(f"bench{i}/results.json")) for i in (1, 2))
    same = sum(x == y for m in b1["per_image"] for x, y in zip(b1["per_image"][m]["average"], b2["per_image"][m]["average"]))
    n = sum(len(v["average"]) for v in b1["per_image"].values())
    print(f"   workers {b2.get('workers')}; per-image averages equal in {same}/{n} images; command seconds "
          f"{b1['seconds']['command']} vs {b2['seconds']['command']}")
    for m in b1["summary"]:
        print(f"   {m}: average {b1['summary'][m]['average']['mean']:.3f} vs {b2['summary'][m]['average']['mean']:.3f}")
if os.path.exists("dp2/run.json"):
    r1, r2 = (json.load(open(f"dp{i}/run.json")) for i in (1, 2))
    diff = max(abs(a[1] - b[1]) for a, b in zip(r1["losses"], r2["losses"]))
    x, y = (load_adapter(f"dp{i}/content.b4m.safetensors") for i in (1, 2))
    w = max((x.tensors[n][p] - y.tensors[n][p]).abs().max().item() for n in x.modules for p in x.tensors[n])
    print(f"3. data parallel: {len(r1['losses'])} loss points, max |loss diff| {diff:.2e}, max |adapter diff| {w:.2e};"
          f" steady s/step {r1['train']['steady_seconds_per_step']} (1 GPU) vs {r2['train']['steady_seconds_per_step']}")
    print("   1 GPU:", [round(v, 4) for _, v in r1["losses"]])
    print("   2 GPU:", [round(v, 4) for _, v in r2["losses"]])
PY
    ;;
*) echo "usage: $0 1|2a|2b|3|report"; exit 2 ;;
esac
