#!/usr/bin/env bash
# One command for the GPU: exactness checks on CUDA (references, CPU == CUDA tokens, chi-square,
# Triton == torch, no host sync inside a step, CUDA-graph replay == eager), then the top-k
# selection alone (the fused kernels' settings against the int64 topk) and the sampling
# benchmark on CUDA (eager step and CUDA-graph replay against transformers).
# Needs torch with CUDA, pluggy, pydantic, PyYAML (carry wheels where they are missing).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 benchmarks/check_cuda.py; status=$?
python3 benchmarks/bench_selection.py || status=1
python3 benchmarks/bench_sampling.py --device cuda --reps 50 "$@"
exit $status
