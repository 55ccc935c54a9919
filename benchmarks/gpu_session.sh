#!/usr/bin/env bash
# One GPU-machine session: kernel and engine tests on the GPU, then the kernel and decode benchmarks.
# Usage (device tool, repo root): bash benchmarks/gpu_session.sh [tests|kernels|decode ...]; results under $OUT.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
[ -e raas_batch/kernels ] || ln -s ../kernels raas_batch/kernels  # raas_batch.kernels without an install
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
parts=${*:-tests kernels decode}
nvidia-smi -L
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for part in $parts; do
  start=$(date +%s)
  case $part in
    tests)   timeout 240 python -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short tests/test_kernels.py tests/test_gpu_engine.py > "$OUT/pytest_gpu.log" 2>&1; tail -30 "$OUT/pytest_gpu.log" ;;
    kernels) timeout 200 python benchmarks/bench_kernels.py 2>&1 | tail -60 ;;
    decode)  timeout 300 python benchmarks/bench_gpu_decode.py 2>&1 | tail -40 ;;
    ray)     timeout 300 python benchmarks/bench_ray_scaling.py 2>&1 | tail -30 ;;
  esac
  echo "== $part took $(( $(date +%s) - start )) s"
done
