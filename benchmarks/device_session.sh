#!/usr/bin/env bash
# One device call (a machine with one CUDA GPU and >= 16 cores), everything it measures under $OUT:
#   1. benchmarks/gpu_check.py part 1 alone on the GPU: ResNet-18 at 8 stages, fp32 and bf16
#      autocast, time per tick and peak memory per weight strategy (clean timings: nothing else
#      on the GPU; the CPU job of step 3 runs on other cores);
#   2. then the transformer (its default recipe) on the GPU, longer than this 2-core machine can:
#      4 stages and 8 stages (n_layer=6), sync / stash / ema, runs in parallel processes;
#   3. meanwhile on cores 6-15: `layerpipe compare` of the transformer at 8 stages, 3 seeds (CPU).
# Usage: OUT=/some/dir LAYERPIPE_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_session.sh
set -u
OUT=${OUT:?set OUT to a folder}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PY:-python3}
pin() { if command -v taskset >/dev/null; then taskset -c "$@"; else shift; "$@"; fi; }
mkdir -p "$OUT/resnet" "$OUT/gpt4" "$OUT/gpt8" /tmp/logs
nvidia-smi -L > /tmp/logs/machine.txt 2>&1; nproc >> /tmp/logs/machine.txt
pin 6-15 timeout 430 $PY -m layerpipe compare --model gpt --model-option n_layer=6 --stages 8 \
    --weights sync,stash,ema --seeds 0,1,2 --samples 3000 --epochs 2 --jobs 9 --threads 1 --device cpu \
    --no-progress --out /tmp/compare-gpt8 > /tmp/logs/compare-gpt8.log 2>&1 &
pin 0-5 timeout 150 $PY benchmarks/gpu_check.py --out "$OUT/resnet" --parts resnet,resnet-bf16 > /tmp/logs/resnet.log 2>&1
pin 0-5 timeout 290 $PY benchmarks/gpu_check.py --out "$OUT/gpt4" --parts gpt --gpt-jobs 3 \
    --gpt-samples 16000 --gpt-epochs 2 > /tmp/logs/gpt4.log 2>&1 &
pin 0-5 timeout 290 $PY benchmarks/gpu_check.py --out "$OUT/gpt8" --parts gpt --gpt-jobs 3 --gpt-stages 8 \
    --gpt-option n_layer=6 --gpt-samples 16000 --gpt-epochs 2 > /tmp/logs/gpt8.log 2>&1 &
wait
tar czf "$OUT/compare-gpt8.tgz" -C /tmp compare-gpt8 2>/dev/null
tar czf "$OUT/logs.tgz" -C /tmp logs
tail -n 30 /tmp/logs/*.log
