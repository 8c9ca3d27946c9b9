#!/usr/bin/env bash
# A prepared accelerator session that finds where bert-base's step time goes: the
# Pallas and cuDNN-attention tests compiled for the GPU (not interpreted), then
# `dsjax-profile --trace` of bert-base under mixed and fp32, ranking programs, XLA
# instructions and CUDA kernels by device time. Results go to $OUT (default runs/gpu):
# pytest.txt, profile_*.json, profile_*.txt.
#
#   bash scripts/gpu_profile.sh
#   MODEL=bert-tiny BATCH=8 STEPS=4 bash scripts/gpu_profile.sh   # smoke test
set -u
OUT=${OUT:-runs/gpu}
MODEL=${MODEL:-bert-base}
BATCH=${BATCH:-128}
STEPS=${STEPS:-8}
PRESETS=${PRESETS:-"mixed fp32"}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh

if [ "${TESTS:-1}" = 1 ]; then
  echo "== Pallas and cuDNN-attention tests on the GPU (tests/conftest.py defaults to CPU)"
  JAX_PLATFORMS=cuda timeout 240 $PY -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_pallas_matmul.py tests/test_nn.py::test_cudnn_attention_matches_float64 \
    tests/test_nn.py::test_fused_attention_refuses_dropout_cpu_cudnn_and_unknown_names \
    2>&1 | tee "$OUT/pytest.txt" | tail -25
fi

# XLA:GPU replays most of a step as CUDA graphs ("command buffers"); their kernels then
# name the graph, not the HLO instruction. Off by default here so that the kernel ranking
# names instructions (COMMAND_BUFFERS=1 keeps them, for timings closer to a normal run).
if [ "${COMMAND_BUFFERS:-0}" = 0 ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="
fi

for preset in $PRESETS; do
  echo "== $MODEL $preset: batch $BATCH, $STEPS traced steps"
  rm -rf "/tmp/prof_$preset"
  # shellcheck disable=SC2086
  timeout 240 $PY -m dsjax.profile --model "$MODEL" --precision "$preset" --batch-size "$BATCH" \
    --gradient-accumulation 1 --steps "$STEPS" --trace --workdir "/tmp/prof_$preset" \
    --config.precision.adaptive=False --config.logging.progress_bar=False $EXTRA 2>&1 \
    | grep -v "^INFO absl\|^I[0-9]\|^W[0-9]" | tee "$OUT/profile_$preset.txt" | tail -60
  cp "/tmp/prof_$preset/profile.json" "$OUT/profile_$preset.json" 2>/dev/null
done
for preset in $PRESETS; do  # The Perfetto/TensorBoard trace itself, when small enough.
  find "/tmp/prof_$preset/trace" -name "*.trace.json.gz" -size -15M \
    -exec cp {} "$OUT/trace_$preset.json.gz" \; 2>/dev/null
done
