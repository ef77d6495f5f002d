#!/bin/bash
# The world-v2 benchmark protocol of docs/benchmarks.md, as run on the GPU machine in commands under its 10-minute
# limit: each call does what fits in LIMIT seconds (default 555) and stops between units; call it again (on the
# same warm machine: runs/ is kept) until it says "done". Results are copied to $OUT (the device tool's folder).
#
#   bash bench/world_v2_protocol.sh grid     # the dev grid's configurations not yet in bench/results/world-v2/dev-grid
#   bash bench/world_v2_protocol.sh grid-wide  # the wider grid's three 600-step configurations, every method alike
#   bash bench/world_v2_protocol.sh levers   # B4M's content-fidelity leads, on dev at B4M's chosen configuration
#   bash bench/world_v2_protocol.sh levers 1   # the levers again at dev seed 1 (docs/benchmarks.md, "Dev at fresh seeds")
#   bash bench/world_v2_protocol.sh make-levers 1  # more make against the bench's make 100, on dev at seed 1 (then 0)
#   bash bench/world_v2_protocol.sh uplr-levers 1  # the content half at 2x and 4x the lr, on dev at seed 1 (then 0)
#   bash bench/world_v2_protocol.sh dev-seeds  # every method at its dev choice on dev at seeds 1 and 2 (diagnostic)
#   bash bench/world_v2_protocol.sh test 0   # every method at its dev choice on the test split, seed 0 (then 1)
#   bash bench/world_v2_protocol.sh demo     # the demo's lr chosen on dev at its step counts; its test-pair share
#
# Environment: WORKERS (default 6), LIMIT (seconds, default 555), START (epoch seconds the LIMIT counts from, so that
# several phases can share one call; bench/gpu_setup.sh sets it when sourced, so its set-up counts), B4M_COMMIT
# (recorded in results.json), SAVE_EVERY (seconds between snapshots of runs/, default 120).
#
# The device machine goes back 30 s after a call, with runs/: the work in progress travels as $OUT/runs.tgz, and a
# later call that carries it as .carry/runs.tgz starts from it (stage-1 adapters and finished units; no per-unit
# scratch folders; without the stage-1 adapters when the file would pass the tool's 16 MiB, which --resume then trains
# again).
set -u
phase=${1:?grid, grid-wide, levers [SEED], make-levers SEED, uplr-levers SEED, dev-seeds, test SEED or demo}
START=${START:-$(date +%s)}; LIMIT=${LIMIT:-555}; WORKERS=${WORKERS:-6}
OUT=${OUT:-runs/out}; mkdir -p "$OUT" runs
[ -f .carry/runs.tgz ] && [ -z "$(ls -d runs/grid runs/levers* runs/make-levers* runs/dev-seed* runs/test-seed* 2>/dev/null)" ] && tar xzf .carry/runs.tgz
save_runs() {  # the device tool brings back files up to 16 MiB: without the stage-1 adapters if need be, then nothing
  # (a temporary name, then a rename: a call killed while tar writes leaves no truncated runs.tgz behind)
  local skip=(--exclude='runs/*/*/runs' --exclude='runs/*/runs' --exclude='runs/*/*/workers' --exclude='runs/out')
  # Only the protocol's own folders: anything else under runs/ (a base model another bench built there, 5 GB for
  # load_time's random SDXL) made the archive outlast the call on 2026-12-06 and lost two calls' work.
  local tmp="$OUT/runs.tgz.part$BASHPID" keep d
  keep=$(ls -d runs/grid runs/levers* runs/make-levers* runs/dev-seed* runs/test-seed* runs/demo runs/chosen.json 2>/dev/null); [ -n "$keep" ] || return 0
  # A finished bench needs only its results and figure: its units, report and stage-1 adapters (11 MB of units for
  # 192 units) would crowd out the unfinished one, and the carry (tree ~52 MB + wheels ~6 MB + runs.tgz) must stay
  # under the tool's 64 MiB.
  for d in runs/*/ runs/grid/*/; do
    complete "${d%/}" && skip+=(--exclude="${d}units" --exclude="${d}report.html" --exclude="${d}workers" \
      --exclude="${d}stage1" --exclude="${d}runs" --exclude="${d}figure-prompts.png")
  done
  tar czf "$tmp" "${skip[@]}" $keep 2>/dev/null
  if [ "$(stat -c %s "$tmp")" -ge 16000000 ]; then
    tar czf "$tmp" "${skip[@]}" --exclude='runs/*/*/stage1' --exclude='runs/*/stage1' $keep 2>/dev/null
  fi
  if [ "$(stat -c %s "$tmp")" -lt 16000000 ]; then mv "$tmp" "$OUT/runs.tgz"; else rm -f "$tmp"; fi
}
# Also every SAVE_EVERY seconds (default 120) while the phase runs: a call killed at the device's limit (SIGKILL, no
# EXIT trap) still brings back the last snapshot, losing at most that much work (2026-12-07: a call killed at 600 s
# before its one save lost ten minutes). Each snapshot has its own temporary name; at exit the saver and its tar are
# stopped before the last save, so an older snapshot cannot replace it.
( while sleep "${SAVE_EVERY:-120}"; do save_runs; done ) & saver=$!
trap 'pkill -P $saver 2>/dev/null; kill $saver 2>/dev/null; wait $saver 2>/dev/null; rm -f "$OUT"/runs.tgz.part*; save_runs' EXIT
left() { echo $(( LIMIT - ($(date +%s) - START) - 30 )); }
complete() { [ -f "$1/results.json" ] && python3 -c "import json,sys; sys.exit(0 if json.load(open('$1/results.json')).get('complete', True) else 1)"; }
bench() {  # bench FOLDER ARGS…: run or resume until LIMIT
  local d=$1; shift
  complete "$d" && return 0
  local l; l=$(left); [ "$l" -lt 40 ] && return 1
  local res=""; [ -d "$d" ] && res="--resume"
  python3 -m b4m.cli bench -o "$d" --preset fast --workers "$WORKERS" --max-minutes "$(python3 -c "print($l/60)")" $res "$@" 2>&1 \
    | grep -v '^\s*$' | tail -3
  complete "$d"
}
chosen() {  # the dev grid's choices (committed configurations and those run here)
  python3 bench/dev_grid.py bench/results/world-v2/dev-grid/* $(ls -d runs/grid/* 2>/dev/null) --json runs/chosen.json >/dev/null
}
chosen6() {  # the six-configuration grid's choices (those of the reported test table), in runs/chosen6.json
  python3 bench/dev_grid.py bench/results/world-v2/dev-grid/lr{1e-3,2e-3,5e-3}-s{150,300} --json runs/chosen6.json >/dev/null
}
b4m_choice() {  # b4m_choice FILE: B4M's chosen lr and steps, "LR STEPS"
  python3 -c "import json; c=json.load(open('$1'))['b4m']; print(c['lr'], c['steps'])"
}
dev_levers() {  # dev_levers FOLDER SEED METHODS: variants against B4M on dev at B4M's six-configuration choice
  local d=$1 seed=$2 methods=$3 lr st
  chosen6; read -r lr st < <(b4m_choice runs/chosen6.json)
  bench "$d" --split dev --seed "$seed" --lr "$lr" --steps "$st" --methods "$methods" \
    && cp "$d/results.json" "$OUT/${d#runs/}.json" && echo done
}
case $phase in
  grid|grid-wide)  # grid-wide: the three 600-step configurations of docs/benchmarks.md, "A wider grid"
    cfgs="1e-3:150 2e-3:150 5e-3:150 1e-3:300 2e-3:300 5e-3:300"; [ "$phase" = grid-wide ] && cfgs="1e-3:600 2e-3:600 5e-4:600"
    for cfg in $cfgs; do
      lr=${cfg%:*}; st=${cfg#*:}
      [ -d "bench/results/world-v2/dev-grid/lr$lr-s$st" ] && continue
      # make 50, as the six configurations ran (the bench's make is 100 since 2026-12-06): one grid, one make
      bench "runs/grid/lr$lr-s$st" --split dev --lr "$lr" --steps "$st" --make-steps 50 || exit 0
    done
    (cd runs && tar cf "$OUT/grid.tar" grid/*/results.json grid/*/results.csv grid/*/figure.png)
    chosen && cp runs/chosen.json "$OUT/" && python3 bench/dev_grid.py bench/results/world-v2/dev-grid/* runs/grid/* \
      | tee "$OUT/grid.md" && echo done ;;
  levers)  # levers [SEED]: seed 0 (the first run, runs/levers) or a dev seed that reproduces the test failure
    # (make's steps: 50 and 200 around the bench's 100 since 2026-12-06; the runs before had make100 around 50)
    # at B4M's choice on the six-configuration grid at every seed (that of seed 0's run and of dev-seeds), whatever
    # the wider grid adds later
    seed=${2:-0}; d=runs/levers; [ "$seed" = 0 ] || d=runs/levers-seed$seed
    chosen6; read -r lr st < <(b4m_choice runs/chosen6.json)
    bench "$d" --split dev --seed "$seed" --lr "$lr" --steps "$st" \
      --methods b4m,b4m-content-high-noise,b4m-content-low-noise,b4m-style-high-noise,b4m-style-low-noise,b4m-make50,b4m-make200,b4m-make0,b4m-content-half,b4m-made-content-half,b4m-style-half,b4m-made-style-half,b4m-make-style-equal,b4m-official-halves \
      && cp "$d/results.json" "$OUT/${d#runs/}.json" && cp "$d/figure.png" "$OUT/${d#runs/}.png" && echo done ;;
  make-levers)  # make-levers SEED: more make (200 steps, or lr 2e-3) against the bench's make 100 (docs/benchmarks.md,
    # "More make? written before any run")
    seed=${2:?seed}; dev_levers "runs/make-levers-seed$seed" "$seed" b4m,b4m-make200,b4m-make-lr2e-3 ;;
  uplr-levers)  # uplr-levers SEED: the content half (B) at 2x and 4x the lr in the break runs (LoRA+'s ratio),
    # against the bench's B4M (docs/benchmarks.md, "The content half's lr")
    seed=${2:?seed}; dev_levers "runs/levers-uplr-seed$seed" "$seed" b4m,b4m-up-lr2,b4m-up-lr4 ;;
  dev-seeds)  # docs/benchmarks.md, "Dev at fresh seeds": every method at its dev choice on dev at seeds 1 and 2
    # at the choices of the six-configuration grid, which the reported test table used (the diagnostics, not in
    # the JSON, run at B4M's choice: the bench's --lr and --steps)
    chosen6; read -r lr st < <(b4m_choice runs/chosen6.json)
    for seed in 1 2; do
      bench "runs/dev-seed$seed" --split dev --seed "$seed" --method-settings runs/chosen6.json --lr "$lr" \
        --steps "$st" --methods default,b4m-style-half,b4m-made-style-half,b4m-content-half,b4m-made-content-half \
        && cp "runs/dev-seed$seed/results.json" "$OUT/dev-seed$seed.json" \
        && cp "runs/dev-seed$seed/figure.png" "$OUT/dev-seed$seed.png" || exit 0
    done
    echo done ;;
  test)  # every method at its dev choice; since 2026-12-06 also B4M with make 50 (the bench's make before it was
    # 100), at B4M's choice, so that the make change is measured inside the run
    seed=${2:?seed}; chosen
    read -r lr st < <(b4m_choice runs/chosen.json)
    bench "runs/test-seed$seed" --split test --seed "$seed" --method-settings runs/chosen.json \
      --methods default,b4m-make50 --lr "$lr" --steps "$st" \
      && cp "runs/test-seed$seed/results.json" "$OUT/test-seed$seed.json" \
      && cp "runs/test-seed$seed/figure.png" "$OUT/test-seed$seed.png" \
      && cp "runs/test-seed$seed/figure-prompts.png" "$OUT/test-seed$seed-prompts.png" && echo done ;;
  demo)  # docs/world.md, "The demo's pair": the real demo (fp32, as on a CPU) over every pair; resumable per run
    mkdir -p runs/demo  # finished runs carried or committed (rows of a CPU sweep: bench/results/world-v2/demo/)
    for f in .carry/demo-*.jsonl bench/results/world-v2/demo/demo-*.jsonl; do  # rows of both, each once
      [ -f "$f" ] || continue; d=runs/demo/$(basename "$f"); touch "$d"
      cat "$d" "$f" | awk '!seen[$0]++' > "$d.tmp" && mv "$d.tmp" "$d"
    done
    for split in dev test; do
      f=runs/demo/demo-$split.json
      if [ ! -f "$f" ]; then
        settings='[{"lr": 0.001}, {"lr": 0.002}, {"lr": 0.005}]'
        [ "$split" = test ] && settings=$(python3 bench/demo_sweep.py --pick runs/demo/demo-dev.json)
        l=$(left); [ "$l" -lt 60 ] && break
        timeout -k 10 "$l" python3 bench/demo_sweep.py --out "$f" --split $split --workers "$WORKERS" \
          --settings "$settings" | tail -4
      fi
      cp runs/demo/demo-$split.json* "$OUT/" 2>/dev/null; [ -f "$f" ] || exit 0
    done
    echo done ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
