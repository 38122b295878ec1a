#!/usr/bin/env bash
# The vLLM engine's GPU checks as one prepared run (the device machine has no network): the
# tests marked gpu in tests/svp/models/test_vllm_engine.py, then bench/bench_vllm.py. vLLM and its
# missing dependencies come as a carried bundle (.vllm_bundle*/, unpacked by its install.sh into
# /tmp/site); on a CUDA machine with network, `pip install -e '.[gpu]'` replaces that step.
# Logs go to $OUT (or ./gpu-logs).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
logs=${OUT:-gpu-logs}
mkdir -p "$logs"
if [ -f .vllm_bundle/install.sh ]; then
  bash .vllm_bundle/install.sh >"$logs/install.log" 2>&1 || { tail -20 "$logs/install.log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
  export VLLM_USE_FLASHINFER_SAMPLER=0  # the bundle carries no FlashInfer: vLLM's PyTorch sampler
else
  export PYTHONPATH=$PWD
fi
python3 -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__, torch.cuda.get_device_name())" || exit 1
timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
  tests/svp/models/test_vllm_engine.py 2>&1 | tee "$logs/tests.log" | tail -40
# The carried bundle has no FlashAttention kernels: Triton paged attention, SDPA in the encoder.
timeout "${BENCH_TIMEOUT:-240}" python3 bench/bench_vllm.py --attention-backend TRITON_ATTN \
  --mm-encoder-attention-backend TORCH_SDPA 2>&1 | tee "$logs/bench.log" | tail -15
