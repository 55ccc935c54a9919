#!/usr/bin/env bash
# One GPU-machine session: kernel and engine tests on the GPU, then the kernel and decode benchmarks.
# Usage (device tool, repo root): bash benchmarks/gpu_session.sh [tests|kernels|step-kernels|overlap|prefill|decode|job-fixed|job-realistic|
# job-others|job-bi|decode7b|matmul|invariance|control|ray ...]; results under $OUT. TESTS_FILES replaces the tests part's
# file list, TESTS_K selects in it; JOB_POLICIES and JOB_TAG replace job-fixed's policies and tag, PROFILE_AT its profiled step (-1: none; job-realistic's too); REAL_ROWS, REAL_POLICIES and REAL_TAG job-realistic's rows, policies and tag; STEP_ARGS are bench_step_kernels.py's arguments; CLOCKS_LOG=1 logs the GPU's clocks and power to $OUT/clocks.csv. The job parts need a tokenizer in .gpu_assets/tok (carry it; see
# benchmarks/bench_job.py).
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
[ -e raas_batch/kernels ] || ln -s ../kernels raas_batch/kernels  # raas_batch.kernels without an install
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
parts=${*:-tests kernels decode}
nvidia-smi -L
if [ -n "${CLOCKS_LOG:-}" ]; then  # the GPU's clocks, power and throttle reasons every 200 ms, for the whole session
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 200 > "$OUT/clocks.csv" 2>&1 &
  clocks_pid=$!
  trap 'kill $clocks_pid 2>/dev/null' EXIT
fi
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for part in $parts; do
  start=$(date +%s)
  case $part in
    tests)   timeout ${TESTS_TIMEOUT:-420} python -m pytest -q -p no:cacheprovider -rfE --tb=short ${TESTS_FILES:-tests/test_policy_kernels.py \
               tests/test_sampling.py::test_sampler_kernel_equals_reference tests/test_sampling.py::test_sampler_screen_keeps_near_ties tests/test_kernels.py tests/test_gpu_engine.py \
               tests/test_batch_invariant.py tests/test_gpu_jobs.py} \
               -m "gpu or not gpu" ${TESTS_K:+-k "$TESTS_K"} > "$OUT/pytest_gpu.log" 2>&1; tail -30 "$OUT/pytest_gpu.log" ;;
    job-fixed) timeout ${JOB_TIMEOUT:-420} python benchmarks/bench_job.py --shape 1.5b --policies ${JOB_POLICIES:-dense,raas} \
               --rows 512 --max-new-tokens 6144 --regime fixed --profile-at ${PROFILE_AT:-3000} --tag ${JOB_TAG:-1p5b_fixed} 2>&1 \
               | grep -v Warning | tail -12 ;;
    job-realistic) timeout ${JOB_TIMEOUT:-420} python benchmarks/bench_job.py --shape 1.5b --policies ${REAL_POLICIES:-dense,raas} \
               --rows ${REAL_ROWS:-512} --max-new-tokens 8192 --regime realistic --num-stop-ids 16 --shard-size ${SHARDS:-512} \
               --profile-at ${PROFILE_AT:-1500} --tag ${REAL_TAG:-1p5b_realistic} 2>&1 | grep -v Warning | tail -12 ;;
    job-others) timeout 420 python benchmarks/bench_job.py --shape 1.5b --policies raas-mass,raas-paper,h2o,streaming \
               --rows 512 --max-new-tokens ${OTHERS_TOKENS:-2048} --regime fixed --profile-at 600 --tag 1p5b_others 2>&1 \
               | grep -v Warning | tail -12 ;;
    control) timeout 240 python benchmarks/bench_invariance.py 2>&1 | grep -v Warning | tail -10 ;;
    decode7b) timeout ${DECODE_TIMEOUT:-300} python benchmarks/bench_gpu_decode.py --only ${DECODE_ONLY:-batch1 dense raas} \
               --profile 2>&1 | tail -20 ;;
    kernels) timeout 200 python benchmarks/bench_kernels.py 2>&1 | tail -60 ;;
    step-kernels) timeout 240 python benchmarks/bench_step_kernels.py ${STEP_ARGS:-} 2>&1 | tail -30 ;;
    overlap) timeout 240 python benchmarks/bench_overlap.py 2>&1 | tail -24 ;;
    prefill) timeout 240 python benchmarks/profile_prefill.py ${PREFILL_ARGS:-} 2>&1 | grep -v Warning | tail -45 ;;
    matmul)  timeout ${MATMUL_TIMEOUT:-300} python benchmarks/bench_matmul.py ${MATMUL_ARGS:-} 2>&1 | grep -v '^{' | tail -40 ;;
    invariance) RAAS_BATCH_FULL_INVARIANCE=1 timeout ${TESTS_TIMEOUT:-420} python -m pytest -q -p no:cacheprovider -rfE \
               --tb=short --durations=5 tests/test_batch_invariant.py -m "gpu or not gpu" > "$OUT/pytest_invariance.log" 2>&1
             tail -15 "$OUT/pytest_invariance.log" ;;
    job-bi)  for bi in "" --batch-invariant; do timeout ${JOB_TIMEOUT:-280} python benchmarks/bench_job.py --shape 1.5b \
               --policies dense,raas --rows 512 --max-new-tokens ${BI_TOKENS:-6144} --regime fixed --profile-at 3000 $bi \
               --tag 1p5b_fixed${bi:+_bi} 2>&1 | grep -v Warning | tail -8; done ;;
    decode)  timeout 300 python benchmarks/bench_gpu_decode.py 2>&1 | tail -40 ;;
    ray)     timeout 300 python benchmarks/bench_ray_scaling.py 2>&1 | tail -30 ;;
  esac
  echo "== $part took $(( $(date +%s) - start )) s (ended $(date +%H:%M:%S.%N | cut -c1-12))"
done
