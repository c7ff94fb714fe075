#!/usr/bin/env bash
# Gate every checkpoint in a folder on its attack success rate and clean accuracy, two at a time.
#
#   examples/ci/gate_checkpoints.sh CHECKPOINT_DIR TEST_DIR TRIGGER_PNG [MAX_ASR] [MIN_ACC]
#
# Writes one JSON document per checkpoint under results/, prints "PASS"/"FAIL"/"ERROR" per
# checkpoint read from the JSON, and exits 1 when any checkpoint did not pass. Each run gets one
# thread of its own (--threads), so the parallel runs do not oversubscribe the cores.
set -euo pipefail

checkpoints=${1:?checkpoint folder}
test_dir=${2:?test folder}
trigger=${3:?trigger PNG}
max_asr=${4:-0.05}
min_acc=${5:-0.80}
jobs=${JOBS:-2}
mkdir -p results

export test_dir trigger max_asr min_acc
find "$checkpoints" -maxdepth 1 -name '*.safetensors' -print0 |
  xargs -0 -P "$jobs" -I{} sh -c '
    scrub evaluate "$1" --test-dir "$test_dir" --trigger "$trigger" --max-asr "$max_asr" --min-acc "$min_acc" \
      --threads 1 --json --quiet > "results/$(basename "$1" .safetensors).json" || true
  ' _ {}

status=0
for document in results/*.json; do
  verdict=$(python3 - "$document" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for model in report["models"]:
    if model["status"] != "ok":
        print(f"ERROR {model['path']}: {model['error']}")
    elif model["gate"]["passed"]:
        print(f"PASS  {model['path']}: ASR {model['attack_success_rate']:.3f}, CA {model['clean_accuracy']:.3f}")
    else:
        print(f"FAIL  {model['path']}: {'; '.join(model['gate']['failures'])}")
if not report["models"]:
    print(f"ERROR {sys.argv[1]}: {report.get('error')}")
PY
)
  echo "$verdict"
  case "$verdict" in PASS*) ;; *) status=1 ;; esac
done
exit $status
