#!/usr/bin/env bash
# Downloads the wheels llm-compressor needs on the GPU machine into .whl/ (git ignores it).
# The GPU image (Python 3.12, torch 2.11, transformers 5.17) already has accelerate, numpy,
# pandas, pyarrow, xxhash, fsspec, huggingface-hub, psutil, pyyaml, requests, tqdm, pillow,
# nvidia-ml-py and py-cpuinfo (KINDS.md's package list); what it lacks is below, about 3.8 MB
# in all: pure-Python wheels, except pydantic-core (compiled: cp312, manylinux x86_64).
# pydantic is not in the image; llm-compressor's modifiers are pydantic models.
# typing-extensions is carried because pydantic 2.14 wants >= 4.16. auto-round, another
# requirement of llmcompressor, is not imported by the SparseGPT and Wanda modifiers.
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
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
)
for wheel in "${wheels[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$wheel"
done
ls -la .whl
du -sh .whl
