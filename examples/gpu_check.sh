#!/usr/bin/env bash
# One prepared GPU session, under 10 minutes on an H100 / H200: the Triton kernel tests on the GPU, then
# examples/bench_kernels.py with the packed GEMV tuned per shape (the 4096x11008 layer and two more,
# int4 g128 and int2 g64, M = 1 and 16). Everything lands in ${OUT:-gpu-out}: gpu.txt, tests.txt,
# bench/results.md|json, bench/tuned.json. Run from the repository root in an environment with CUDA torch and
# triton; qexport is installed without dependencies (pip install --no-deps -e .) when it is not importable.
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
python -c "import qexport" 2>/dev/null || pip install -q --no-deps -e . > "$out/install.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt" 2>&1
timeout 200 python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_gpu.py \
    > "$out/tests.txt" 2>&1
echo "pytest exit status $?" >> "$out/tests.txt"
timeout 330 python examples/bench_kernels.py --out "$out/bench" --shapes 4096x11008,11008x4096,4096x4096 \
    --m 1,16 --formats int4g128,int2g64 --tune > "$out/bench.txt" 2>&1
echo "bench exit status $?" >> "$out/bench.txt"
tail -n 40 "$out/bench.txt"
