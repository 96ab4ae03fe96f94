#!/usr/bin/env bash
# Run HERE (the CPU machine, with network to the package index) before a GPU session: puts into .gpu/ (ignored
# by git, carried to the device with carry=[".gpu"]) what the device machine lacks: the oracle's mmcv shim
# and wheels of the packages its image does not hold (jsonargparse for our configs; mmdet 3.3.0, mmengine,
# mmcv-lite and their needs for --vs-mmdet), built for its Python 3.12 on x86-64. Then call the device tool:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".gpu"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .gpu/oracle .gpu/whl
cp "${ORACLE:-../shared/oracle}/mmcv_ops_shim.py" .gpu/oracle/
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
binary() {  # compiled packages: wheels for cp312 only
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .gpu/whl "$@"
}
pure() {    # pure-Python packages (some publish sdists only, e.g. mmcv-lite)
  python3 -m pip download -q --no-deps -d .gpu/whl "$@"
}
binary pycocotools shapely
pin() { grep -i "^$1==" constraints.txt; }  # our pinned versions
pure "$(pin jsonargparse)" "$(pin docstring-parser)" "$(pin typeshed-client)" \
  mmengine==0.10.7 mmdet==3.3.0 mmcv-lite==2.1.0 addict yapf platformdirs terminaltables termcolor
du -sh .gpu
ls .gpu/whl
