#!/usr/bin/env bash
# Downloads the pure-Python wheels llm-compressor needs on the GPU machine into .whl/
# (git ignores it). The GPU image (Python 3.12, torch 2.11, transformers 5.17) already has
# accelerate, numpy, pandas, pyarrow, xxhash, fsspec, huggingface-hub, pydantic, psutil,
# pyyaml, requests, tqdm, pillow, nvidia-ml-py and py-cpuinfo; what it lacks is below
# (about 1.6 MB in all). auto-round, another requirement of llmcompressor, is not imported
# by the SparseGPT and Wanda modifiers and is left out.
#
# Run from the project root:   benchmarks/stage_wheels.sh
# Then carry .whl with a device call and start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
root="$(git rev-parse --show-toplevel)"; cd "$root"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
wheels=(
  llmcompressor==0.14.0.1
  compressed-tensors==0.19.0
  loguru==0.7.3
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
)
for wheel in "${wheels[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$wheel"
done
ls -la .whl
du -sh .whl
