#!/usr/bin/env bash
# The quickest check of a GPU node: `sft-job run --smoke` on CUDA (both epoch ends, their
# checkpoints and samples, generation), then a preempted run (SIGUSR1 after its first checkpoint)
# and its rerun, which must resume and complete. Prints one summary line per run, and exits 1 unless
# the smoke and the rerun exit 0 and the preempted run 75.
#   bash scripts/gpu-smoke.sh DATA_DIR OUT_DIR
# DATA_DIR: the book's instruction-data.json (the smoke trains on it); it is also the runs' cache, where
# the smoke writes its own small data (smoke/), so a writable folder, e.g. a cache filled by `sft-job download`.
# Its inputs, nvidia-smi and torch's CUDA are checked first: a problem is one line on stderr and exit 2 (the
# arguments) or 1 (the data or the node), before any run starts.
set -uo pipefail
fail() { echo "gpu-smoke: $2" >&2; exit "$1"; }
(($# == 2)) || fail 2 "usage: bash scripts/gpu-smoke.sh DATA_DIR OUT_DIR (got $# arguments)"
data=$1; out=$2
[[ -d $data ]] || fail 1 "DATA_DIR $data is not a folder (a cache filled by \`sft-job download\`)"
[[ -s $data/instruction-data.json ]] || fail 1 "$data/instruction-data.json is missing or empty (sft-job download fills it)"
[[ -w $data ]] || fail 1 "DATA_DIR $data is not writable (the smoke writes its data under smoke/ there)"
mkdir -p "$out" 2>/dev/null && [[ -w $out ]] || fail 1 "OUT_DIR $out cannot be created or written"
command -v nvidia-smi >/dev/null || fail 1 "nvidia-smi not found: no NVIDIA driver on this node (or not on PATH)"
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1) || fail 1 "nvidia-smi failed: ${gpu//$'\n'/ }"
torch=$(python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' 2>&1) ||
  fail 1 "torch sees no CUDA device: $(tail -n 1 <<<"$torch")"
echo "$gpu"; echo "$torch"
sft=(python3 -m job.cli run --smoke --skip-judge --require-gpu --data "$data/instruction-data.json" --cache "$data"
     --output "$out/runs" --metrics-port 0 --log-format json)
summary() {  # the events that matter, from a JSON log
  python3 - "$1" <<'PY'
import json, sys
events = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
pick = {"finetune_start": ("precision", "device"), "sample": ("epoch",), "checkpoint": ("step", "seconds"),
        "resumed": ("step",), "finetune_done": ("steps",), "stage_failed": ("error", "exit_code"),
        "job_crashed": ("error",), "generate_done": ("seconds",), "run_complete": ()}
for e in events:
    if e["event"] in pick:
        print("  ", e["event"], {k: e.get(k) for k in pick[e["event"]]})
PY
}

start=$EPOCHREALTIME
"${sft[@]}" --run-id smoke >"$out/smoke.jsonl" 2>"$out/smoke.err"
rc=$?; failed=$((rc != 0)); echo "smoke: exit $rc in $(python3 -c "print(round($EPOCHREALTIME - $start, 1))") s"; summary "$out/smoke.jsonl"; tail -n 3 "$out/smoke.err"

# 800 entries, a checkpoint every 20 steps: SIGUSR1 lands mid-epoch, after the first one.
long=(--run-id preempt --train-limit 800 --checkpoint-every 20)
"${sft[@]}" "${long[@]}" >"$out/preempt-1.jsonl" 2>"$out/preempt-1.err" &
pid=$!
# Until its first checkpoint (at most 60 s), or until it ends without one: then there is nothing to preempt.
for _ in $(seq 600); do
  grep -q '"event": "checkpoint"' "$out/preempt-1.jsonl" 2>/dev/null && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
kill -USR1 $pid 2>/dev/null; wait $pid
rc=$?; failed=$((failed || rc != 75)); echo "preempted: exit $rc (75 expected)"; summary "$out/preempt-1.jsonl"
"${sft[@]}" "${long[@]}" >"$out/preempt-2.jsonl" 2>"$out/preempt-2.err"
rc=$?; failed=$((failed || rc != 0)); echo "rerun: exit $rc"; summary "$out/preempt-2.jsonl"; tail -n 3 "$out/preempt-2.err"
if ((failed)); then echo "gpu-smoke: FAILED (see the exits above)"; exit 1; fi
echo "gpu-smoke: all three runs as expected"
