#!/usr/bin/env bash
# One prepared accelerator session (see docs/benchmarks.md): the Pallas matmul against
# XLA, then bert-base step time, TFLOP/s and MFU under fp32, bf16 and mixed (with the
# adaptive precision controller on and off). Results go to $OUT (default runs/gpu):
# matmul.json, bert.json, log.txt.
#
#   bash scripts/gpu_check.sh                     # on the GPU machine
#   MODEL=bert-tiny BATCH=8 STEPS=4 SIZES=256 bash scripts/gpu_check.sh   # smoke test
#   SIZES= PRESETS="mixed-fixed mixed-fixed-rbg mixed-fixed-rbg-unroll" bash scripts/gpu_check.sh
#   SIZES= PRESETS="fp32-highest mixed-fixed-rbg-unroll mixed-fixed-rbg-unroll-cudnn" \
#     bash scripts/gpu_check.sh
#
# A run is a preset followed by -options: fixed (precision.adaptive=False), rbg
# (train.dropout_rng=rbg), unroll (model.scan_unroll=12), nodrop (model.dropout_rate=0),
# highest (JAX_DEFAULT_MATMUL_PRECISION=highest: float32 matmuls without TF32), cudnn
# (model.attention_impl=cudnn, fused flash attention, no attention-weight dropout).
#
# Wheels for packages the machine lacks are read from .whl/ (scripts/gpu_env.sh).
set -u
OUT=${OUT:-runs/gpu}
MODEL=${MODEL:-bert-base}
BATCH=${BATCH:-128}
STEPS=${STEPS:-40}
SIZES=${SIZES-"4096 8192"}
PRESETS=${PRESETS:-"fp32 bf16 mixed mixed-fixed"}
mkdir -p "$OUT"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh

if [ -n "$SIZES" ]; then  # SIZES= skips the matmul benchmark.
  echo "== Pallas matmul vs XLA"
  # shellcheck disable=SC2086
  timeout 200 $PY scripts/bench_matmul.py --sizes $SIZES --repeats 10 --out "$OUT/matmul.json"
fi

echo "== $MODEL: batch $BATCH, $STEPS steps per precision"
for run in $PRESETS; do
  preset=${run%%-*}
  extra=""
  matmul_precision=${JAX_DEFAULT_MATMUL_PRECISION:-}
  for option in $(echo "${run#"$preset"}" | tr '-' ' '); do
    case $option in
      fixed) extra="$extra --config.precision.adaptive=False" ;;
      rbg) extra="$extra --config.train.dropout_rng=rbg" ;;
      unroll) extra="$extra --config.model.scan_unroll=12" ;;
      nodrop) extra="$extra --config.model.dropout_rate=0.0" ;;
      cudnn) extra="$extra --config.model.attention_impl=cudnn"
             extra="$extra --config.model.attention_dropout_rate=0.0" ;;
      highest) matmul_precision=highest ;;
      *) echo "unknown run option $option in $run" >&2; exit 2 ;;
    esac
  done
  rm -rf "/tmp/gpu_$run"
  # shellcheck disable=SC2086
  env ${matmul_precision:+JAX_DEFAULT_MATMUL_PRECISION=$matmul_precision} \
  timeout 240 $PY -m dsjax.train --model "$MODEL" --precision "$preset" --batch-size "$BATCH" \
    --gradient-accumulation 1 --steps "$STEPS" --workdir "/tmp/gpu_$run" \
    --config.train.log_every_steps=10 --config.train.eval_every_steps=100000 \
    --config.checkpoint.every_steps=100000 --config.logging.progress_bar=False $extra \
    2>&1 | grep -v "^INFO absl" | tail -4
done
$PY - "$OUT" "$PRESETS" <<'EOF'
import json, statistics, sys
from pathlib import Path

out, runs = Path(sys.argv[1]), sys.argv[2].split()
result = {}
for run in runs:
  path = Path(f"/tmp/gpu_{run}/metrics.jsonl")
  if not path.exists():
    result[run] = {"error": "no metrics (the run failed; see log)"}
    continue
  records = [json.loads(line) for line in path.read_text().splitlines()]
  steady = [r for r in records if "step_ms" in r][1:] or records  # Skip the first window.
  summary = json.loads(Path(f"/tmp/gpu_{run}/summary.json").read_text())
  result[run] = {key: statistics.median(r[key] for r in steady if key in r)
                 for key in ("step_ms", "mfu", "tflops_per_device", "examples_per_sec",
                             "fp16_matmul_flops_fraction")}
  result[run].update({k: summary.get(k) for k in ("flops_per_step", "peak_flops",
                                                  "peak_flops_source", "compile_time_s",
                                                  "test_loss")})
  result[run]["peak_bytes"] = summary.get("memory", {}).get("peak_bytes")
  result[run]["final_loss"] = records[-1].get("loss")
for run, row in result.items():
  print(run, json.dumps(row))
(out / "bert.json").write_text(json.dumps(result, indent=1))
EOF
