#!/usr/bin/env bash
# One command for the GPU: exactness checks on CUDA, then the sampling benchmark on CUDA.
# Needs torch with CUDA, pluggy, pydantic, PyYAML (carry wheels where they are missing).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 benchmarks/check_cuda.py; status=$?
python3 benchmarks/bench_sampling.py --device cuda --reps 50 "$@"
exit $status
