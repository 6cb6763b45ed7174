#!/usr/bin/env bash
# The GPU checks of issues 19 and 20 as one prepared run for a lent device (about 9 minutes):
# the CUDA-only tests, benchmarks/gpu.py's sections with the profile, and packing on the GPU
# (SDPA's block mask against varlen and flex attention, the padded path and the peer).
#
# Here, once: the device image has torch, triton, transformers and peft, but neither
# bitsandbytes (the peer) nor gguf (which `import qlora` needs), so carry their wheels:
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl bitsandbytes==0.50.2 gguf==0.19.0        # 41 MiB: the tree then travels at about 52 MiB
# Then, with the device tool: run(command="bash benchmarks/device.sh", carry=[".whl"], timeout_s=600).
# Each step's whole log lands in $OUT (it comes back); its tail is printed.
set -u
PY=${PY:-python3}  # the device image's python3 holds torch
OUT=${OUT:-/tmp/qlora-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
fi

step() {  # step SECONDS NAME COMMAND...: run it under a time limit, log to $OUT/NAME.log
    local seconds=$1 name=$2
    shift 2
    echo "== $name ($seconds s at most): $*"
    timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
    echo "   rc=$?"
    tail -n 30 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
step 60 cuda-tests "$PY" -m pytest -q -p no:cacheprovider \
    tests/model/test_varlen.py tests/quant/test_tensor.py \
    tests/train/test_loop.py::test_checkpoint_rng_includes_the_cuda_generator
step 300 gpu "$PY" benchmarks/gpu.py --sections correct,decode,layer,train,resume --profile
step 150 packing "$PY" benchmarks/packing.py --device cuda \
    --setups packed,packed-varlen,packed-flex,padded,peer-flatten
