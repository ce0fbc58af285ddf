#!/usr/bin/env bash
# One prepared run for a lent GPU machine (issue 18 §3): radssl vs lightly img/s at 28 px and 224 px, resident vs
# streamed pretraining, and a small study through `--executor ray` with fractional GPUs. Planned to fit 10 minutes:
# every step has its own time limit, and a step that fails or runs out of time is recorded and the suite goes on.
#
# Usage (from the repository root):
#   bash benchmarks/gpu_suite.sh          # on the GPU machine
#   bash benchmarks/gpu_suite.sh --cpu    # tiny sizes on the CPU: checks every step runs (numbers mean nothing)
# JSON goes to $OUT when set (the device tool's output folder), else benchmarks/results/gpu/ (or .../gpu-cpu-check/
# with --cpu); suite.json lists each step with its exit status and wall time. PYTHON picks the interpreter.
set -u -o pipefail

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${OUT:-}" ]]; then DIR="$OUT"; elif [[ $MODE == cpu ]]; then DIR="benchmarks/results/gpu-cpu-check";
else DIR="benchmarks/results/gpu"; fi
mkdir -p "$DIR"
LOG="$DIR/suite.log"
: > "$LOG"
STEPS_JSON=()

if [[ $MODE == gpu ]]; then
  DEVICE=cuda; CORES="$(nproc)"
  # Per-size settings: pixels, stem, batch, steps, warm-up, DataLoader workers for lightly; per-step time limits (s)
  T28=(--size 28 --batch-size 256 --steps 20 --warmup 5 --workers 8 --threads "$CORES")
  T224=(--size 224 --synthetic --stem standard --batch-size 128 --steps 12 --warmup 4 --workers 12 --threads "$CORES")
  S28=(--size 28 --batch-size 256 --steps 20 --warmup 5 --rounds 2 --threads "$CORES")
  S224=(--size 224 --synthetic --stem standard --batch-size 128 --steps 10 --warmup 3 --rounds 2 --threads "$CORES")
  # Worst case 90 + 90 + 120 + 75 + 100 + 100 = 575 s: the suite fits a 10-minute device call.
  L_T28=90; L_T224=120; L_S28=75; L_S224=100; LIMIT_STUDY=100
  python_check='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
  if ! "$PY" -c "$python_check"; then echo "gpu_suite: no CUDA device here; use --cpu for the CPU check" >&2; exit 2; fi
else
  DEVICE=cpu
  T28=(--size 28 --synthetic --batch-size 16 --steps 2 --warmup 1 --workers 0 --threads 1)
  T224=(--size 64 --synthetic --stem standard --batch-size 8 --steps 2 --warmup 1 --workers 0 --threads 1)
  S28=(--size 28 --synthetic --batch-size 16 --steps 2 --warmup 1 --rounds 1 --threads 1)
  S224=(--size 64 --synthetic --stem standard --batch-size 8 --steps 2 --warmup 1 --rounds 1 --threads 1)
  L_T28=300; L_T224=300; L_S28=200; L_S224=200; LIMIT_STUDY=300
fi

# run NAME LIMIT_S COMMAND...: one step, time-limited; its status and wall time go to suite.json
run() {
  local name="$1" limit="$2"; shift 2
  local start end rc
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  end=$(date +%s)
  echo "== $name: exit $rc after $((end - start)) s" | tee -a "$LOG"
  STEPS_JSON+=("{\"step\": \"$name\", \"exit\": $rc, \"wall_s\": $((end - start))}")
}

# 1. radssl (end to end with prefetch, no prefetch, streamed; model only) vs lightly, 28 px both stems and 224 px.
run throughput_28_small "$L_T28" "$PY" benchmarks/throughput.py --device "$DEVICE" --stem small "${T28[@]}" \
  --output "$DIR/throughput_28_small.json"
run throughput_28_standard "$L_T28" "$PY" benchmarks/throughput.py --device "$DEVICE" --stem standard "${T28[@]}" \
  --output "$DIR/throughput_28_standard.json"
run throughput_224 "$L_T224" "$PY" benchmarks/throughput.py --device "$DEVICE" "${T224[@]}" \
  --output "$DIR/throughput_224.json"

# 2. resident vs streamed, interleaved rounds.
run scale_stream_28 "$L_S28" "$PY" benchmarks/scale_stream.py --device "$DEVICE" "${S28[@]}" \
  --output "$DIR/scale_stream_28.json"
run scale_stream_224 "$L_S224" "$PY" benchmarks/scale_stream.py --device "$DEVICE" "${S224[@]}" \
  --output "$DIR/scale_stream_224.json"

# 3. A small study through Ray with fractional GPUs (benchmarks/scale_study.py; its config's `resources:` block
#    gives cells a share of a GPU, e.g. {pretrain: {gpus: 1, cpus: 4}, cell: {gpus: 0.25, cpus: 1}}). Optional
#    flags are passed only when the script offers them; a missing script or a failure is recorded, not fatal.
if [[ -f benchmarks/scale_study.py ]]; then
  HELP="$("$PY" benchmarks/scale_study.py --help 2>/dev/null || true)"
  EXTRA=()
  if grep -q -- "--output" <<<"$HELP"; then EXTRA+=(--output "$DIR/study_ray.json"); fi
  if [[ $MODE == cpu ]] && grep -q -- "--quick" <<<"$HELP"; then EXTRA+=(--quick); fi
  run study_ray "$LIMIT_STUDY" "$PY" benchmarks/scale_study.py --executor ray "${EXTRA[@]}"
else
  echo "== study_ray: skipped (benchmarks/scale_study.py not present)" | tee -a "$LOG"
  STEPS_JSON+=("{\"step\": \"study_ray\", \"exit\": null, \"wall_s\": 0, \"skipped\": \"benchmarks/scale_study.py not present\"}")
fi

# suite.json: which steps ran, their status, and the machine (written atomically).
JOINED="$(IFS=,; echo "${STEPS_JSON[*]}")"
"$PY" - "$DIR/suite.json" "$MODE" "[$JOINED]" <<'EOF'
import json, os, platform, sys
from pathlib import Path
import torch
from radssl.atomic import write_text_atomic
path, mode, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
record = {"mode": mode, "steps": steps, "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
          "torch": torch.__version__}
write_text_atomic(Path(path), json.dumps(record, indent=2))
print(f"gpu_suite: {sum(s['exit'] == 0 for s in steps)}/{len(steps)} steps succeeded; results in {Path(path).parent}")
EOF
