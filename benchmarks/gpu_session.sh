#!/usr/bin/env bash
# The whole GPU check in one go (about 8 minutes on an H200), run ON the device machine from the repository
# root, after benchmarks/gpu_session_prepare.sh was run here:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".gpu"], timeout_s=560)
# Writes one log per measurement under $OUT (or ./gpu_logs without the device tool); each step has its own
# time limit, so a slow or failing step leaves the others' logs.
set -uo pipefail
out="${OUT:-gpu_logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu/whl ] && ls .gpu/whl/* >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .gpu/whl/* \
    > "$out/pip.log" 2>&1 || echo "pip install of .gpu/whl failed: see pip.log"
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
shim=.gpu/oracle
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
  "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
  python3 -c "import mmdet; print('mmdet', mmdet.__version__)" 2>&1 | tail -1; } | tee "$out/env.log"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   rc=$? in $((SECONDS - t0)) s; last lines:"; tail -n 25 "$out/$name.log"
}
# counts (same as on CPU: they do not depend on the device) and per-step timings, ours and mmdet
step gpu_readiness 120 python3 benchmarks/gpu_readiness.py --device cuda --vs-mmdet --mmcv-shim "$shim" --runs 10
# the README's GPU table: 800x1344 (COCO's 1333x800 padded to 32), inference at batch 1, training at 2
step htc_speed 300 python3 benchmarks/htc_speed.py --device cuda --height 800 --width 1344 --batch-sizes 2 \
  --precisions 32 16-mixed bf16-mixed --vs-mmdet --mmcv-shim "$shim" --runs 5 --warmup 2
echo "logs in $out: $(ls "$out" | tr '\n' ' ')"
