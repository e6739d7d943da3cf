#!/usr/bin/env bash
# One device call (a machine with one CUDA GPU and >= 16 cores), everything it measures under $OUT:
#   1. benchmarks/gpu_check.py part 1 alone on the GPU: ResNet-18 at 8 stages, fp32 and bf16
#      autocast, time per tick and peak memory per weight strategy (clean timings: nothing else
#      on the GPU; the CPU job of step 3 runs on other cores); then with the fused update;
#   2. then the transformer (its default recipe) on the GPU, longer than this 2-core machine can:
#      4 stages and 8 stages (n_layer=6), sync / stash / ema, runs in parallel processes;
#   3. meanwhile on cores 6-15: `layerpipe compare` runs of the transformer on the CPU (CPU_JOB below).
# Usage: OUT=/some/dir LAYERPIPE_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_session.sh
set -u
OUT=${OUT:?set OUT to a folder}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PY:-python3}
pin() { if command -v taskset >/dev/null; then taskset -c "$@"; else shift; "$@"; fi; }
mkdir -p "$OUT/resnet" "$OUT/resnet-fused" "$OUT/gpt4" "$OUT/gpt8" /tmp/logs /tmp/cpu
nvidia-smi -L > /tmp/logs/machine.txt 2>&1; nproc >> /tmp/logs/machine.txt
# CPU_JOB=gpt8 (default): the 8-stage compare; anneal: PipeMare's anneal length at 4 stages;
# lr: the pipelined run's learning rate at 4 stages (with sync and the default as controls)
cpu_compare() {  # name, then compare's arguments
    local name=$1; shift
    pin 6-15 timeout 380 $PY -m layerpipe compare --model gpt --seeds 0,1,2 --threads 1 --device cpu \
        --no-progress --out /tmp/cpu/$name "$@" > /tmp/logs/$name.log 2>&1
}
case ${CPU_JOB:-gpt8} in
gpt8) cpu_compare gpt8 --model-option n_layer=6 --stages 8 --weights sync,stash,ema --samples 3000 --epochs 2 \
          --jobs 9 & ;;
anneal) for a in 1000 3000 10000; do
            cpu_compare anneal$a --stages 4 --weights ema --samples 4000 --epochs 2 --jobs 3 \
                --compensation muon --compensation pipemare:anneal=$a,warmup=30 &
        done ;;
lr) cpu_compare lr-default --stages 4 --weights sync,ema --samples 4000 --epochs 2 --jobs 6 &
    for lr in 8e-3 4e-3; do
        cpu_compare lr$lr --stages 4 --weights ema --samples 4000 --epochs 2 --jobs 3 --lr $lr &
    done ;;
esac
pin 0-5 timeout 150 $PY benchmarks/gpu_check.py --out "$OUT/resnet" --parts resnet,resnet-bf16 > /tmp/logs/resnet.log 2>&1
# the fused update (its triton kernels compile in each run's warm-up: a longer limit of its own)
pin 0-5 timeout 200 $PY benchmarks/gpu_check.py --out "$OUT/resnet-fused" --parts resnet-fused \
    > /tmp/logs/resnet-fused.log 2>&1
# GPT_LR: learning rates of the GPU transformer runs (default: the recipe's); GPT_WEIGHTS: strategies
pin 0-5 timeout 240 $PY benchmarks/gpu_check.py --out "$OUT/gpt4" --parts gpt --gpt-jobs 3 --gpt-lr "${GPT_LR:-}" \
    --gpt-weights "${GPT_WEIGHTS:-sync,stash,ema}" --gpt-samples 12000 --gpt-epochs 2 > /tmp/logs/gpt4.log 2>&1 &
pin 0-5 timeout 240 $PY benchmarks/gpu_check.py --out "$OUT/gpt8" --parts gpt --gpt-jobs 3 --gpt-lr "${GPT_LR:-}" \
    --gpt-weights "${GPT_WEIGHTS:-sync,stash,ema}" --gpt-stages 8 --gpt-option n_layer=6 --gpt-samples 12000 \
    --gpt-epochs 2 > /tmp/logs/gpt8.log 2>&1 &
wait
tar czf "$OUT/cpu.tgz" -C /tmp cpu 2>/dev/null
tar czf "$OUT/logs.tgz" -C /tmp logs
tail -n 30 /tmp/logs/*.log
