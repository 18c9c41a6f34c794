#!/usr/bin/env bash
# Every check that needs a GPU, in one device call (about 5 minutes on an H200).
#
# The device machine (see /work/.library/device) has torch, pytest, scikit-learn,
# tqdm, matplotlib and threadpoolctl but neither pytorch-metric-learning nor faiss-cpu:
# fetch their wheels here first, into a folder git ignores, and carry it:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       pytorch-metric-learning==2.9.0 faiss-cpu==1.15.1
#
# then run it with the device tool: command "bash benchmarks/gpu_checks.sh",
# carry [".whl"], timeout_s 590 (the steps' limits add up to 570 s; expect ~5 min).
# Everything it prints lands in $OUT (or /tmp/gpu_checks):
# gpu.txt (the card and versions), tests.txt (the CUDA tests, which skip on CPU),
# losses_fp32.txt / losses_bf16.txt (benchmarks/losses.py --device cuda at 10k and 100k
# classes, against PML and the three-product floor) and accuracy.txt
# (benchmarks/accuracy.py --device cuda: ours against PML's CustomKNN at CUB and SOP
# size), profile.txt (benchmarks/profile_steps.py --device cuda: where the time goes).
# Each step has its own time limit, so one slow step cannot starve the others.
set -u -o pipefail
out="${OUT:-/tmp/gpu_checks}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, faiss, pytorch_metric_learning as p; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); \
print('faiss', faiss.__version__, 'pml', p.__version__)"
} > "$out/gpu.txt" 2>&1

# 1. the tests that skip without CUDA (the whole dtype-pair matrix on the card and
#    under CUDA autocast against the float64 reference, one sync per forward, CUDA k-nn
#    equal to CPU, the CLIs on cuda, ...): 25 s on an H200
timeout 90 python3 -m pytest -q -rfEs --durations=5 -p no:cacheprovider -k "cuda or gpu" \
    tests/losses tests/functional tests/evaluation tests/bench/test_cli_sphere.py \
    tests/bench/test_cli_bench.py > "$out/tests.txt" 2>&1
echo "tests exit $?" >> "$out/tests.txt"

# 2. the class-weight losses on the GPU: fp32 and bf16 autocast, 10k and 100k classes
losses="arcface,cosface,sphereface,nsl,subcenter,elasticface,adacos,magface,adaface,curricularface"
timeout 80 python3 benchmarks/losses.py --device cuda --repeats 20 \
    --sizes 256x512x10000 --losses "$losses" > "$out/losses_fp32.txt" 2>&1
echo "exit $?" >> "$out/losses_fp32.txt"
timeout 60 python3 benchmarks/losses.py --device cuda --repeats 20 \
    --sizes 512x512x100000 --losses arcface,cosface,nsl >> "$out/losses_fp32.txt" 2>&1
echo "exit $?" >> "$out/losses_fp32.txt"
timeout 70 python3 benchmarks/losses.py --device cuda --dtype bf16 --repeats 20 \
    --sizes 256x512x10000,512x512x100000 --losses arcface,cosface,nsl \
    > "$out/losses_bf16.txt" 2>&1
echo "exit $?" >> "$out/losses_bf16.txt"

# 3. where the time goes on the card: profiler tables of the 10k ArcFace step and of the
#    calculator at SOP size (k="max_bin_count") and CUB size (k=None)
timeout 60 python3 benchmarks/profile_steps.py --device cuda > "$out/profile.txt" 2>&1
echo "exit $?" >> "$out/profile.txt"

# 4. the retrieval calculator at CUB and SOP size against PML's CustomKNN on the card
# three calls per case: the median leaves out the first call's CUDA set-up (cuBLAS
# handles, kernel loading), which a median of two would average in
timeout 150 python3 benchmarks/accuracy.py --device cuda --repeats 3 \
    --only CUB-test SOP-test > "$out/accuracy.txt" 2>&1
echo "exit $?" >> "$out/accuracy.txt"
#    ... and with PML's default k=None (whole ranked lists) at CUB size: never measured on
#    a GPU yet (the whole-list path re-scores every pair in float64)
timeout 60 python3 benchmarks/accuracy.py --device cuda --repeats 3 --k none \
    --only CUB-test >> "$out/accuracy.txt" 2>&1
echo "exit $?" >> "$out/accuracy.txt"
