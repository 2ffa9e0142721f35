#!/usr/bin/env bash
# The benchmarks that need a CUDA GPU, in one go (a few minutes on an H100). Logs go to ${OUT:-bench/out}.
#   bash bench/gpu.sh
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$out/gpu.txt"
# LoRA training, the w2w recipe at SD 1.5 shape: one identity at a time (PEFT) vs batched, bf16 then fp32
python3 bench/bench_ingest.py --sd15 --device cuda --dtype bf16 --steps 20 --identities 8 --batches 1,4,8 --rounds 2 \
    2>&1 | grep -v -i "deprecat\|kept in float32\|clip_sample" | tee "$out/ingest-bf16.log"
# inversion at the paper's scale (K = 10,000): the paper's loop vs ours
python3 bench/bench_invert_sd15.py --device cuda --dtype bf16 --components 10000 \
    2>&1 | grep -v -i "deprecat\|kept in float32\|clip_sample" | tee "$out/invert-bf16.log"
python3 bench/bench_ingest.py --sd15 --device cuda --dtype fp32 --steps 20 --identities 4 --batches 1,4 --rounds 1 \
    2>&1 | grep -v -i "deprecat\|kept in float32\|clip_sample" | tee "$out/ingest-fp32.log"
# the subspace fit (issue 17), N = 16,384, D = 99,648 (a 6.5 GB file made first, ~1 min): ours with every
# product on the GPU (blocks streamed from the file through pinned buffers) vs torch.svd_lowrank on the GPU
# with the whole matrix there; FIT_K10000=1 adds the paper's k = 10,000 (basis on disk, < 8 GB of host RAM)
python3 bench/bench_fit.py --n 16384 --k 1000 --device cuda --sides ours,torch --no-reference 2>&1 | tee "$out/fit-cuda.log"
if [ "${FIT_K10000:-0}" = 1 ]; then
    python3 bench/bench_fit.py --n 16384 --k 10000 --device cuda --max-memory-gb 8 --sides ours,torch --no-reference \
        2>&1 | tee "$out/fit-cuda-k10000.log"
fi
