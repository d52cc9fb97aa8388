#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no Node.js (the lent device machines).
#
#   bash scripts/gpu-check.sh --prepare [peers-dir]   here: node (xz), the bundled check, the PyTorch peers
#                                                      go to .carry/ (ignored by git); carry .carry and
#                                                      build/Release/priortune.node
#   bash scripts/gpu-check.sh [sections...]            there: runs the check (sections: checks gemm steps knn,
#                                                      default all) and the PyTorch peers (PEERS=0 skips them);
#                                                      results in $OUT (or ./gpu-results)
#
# The addon is the one built here (build/Release/priortune.node: nvcc compiles sm_80 and sm_90a, the CUDA
# runtime is static), so nothing is compiled there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  peers="${2:-../shared/peers}"
  mkdir -p .carry
  xz -6 -c "$(command -v node)" > .carry/node.xz
  npx esbuild scripts/gpu-check.ts --bundle --platform=node --format=esm --outfile=.carry/gpu-check.mjs \
    --external:*.node --log-level=warning
  for f in gpu_peer.py gpu_peer_llama.py; do
    if [ -f "$peers/$f" ]; then cp -f "$peers/$f" .carry/ && chmod u+w ".carry/$f"; else echo "note: no $peers/$f (the peer runs are skipped)"; fi
  done
  echo "prepared .carry/ ($(du -sh .carry | cut -f1)); carry: .carry build/Release/priortune.node"
  exit 0
fi

out="${OUT:-gpu-results}"
mkdir -p "$out"
xz -dc .carry/node.xz > /tmp/node && chmod +x /tmp/node
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt" || true
# cuBLASLt for the GEMM comparison: PyTorch's wheels carry one outside the loader path (none: ours alone).
if [ -z "${PRIORTUNE_CUBLASLT:-}" ]; then
  roots="/usr/local/cuda /usr/lib /opt $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)"
  PRIORTUNE_CUBLASLT="$(find $roots -name 'libcublasLt.so*' -type f 2>/dev/null | sort -r | head -1 || true)"
  export PRIORTUNE_CUBLASLT
  echo "cuBLASLt: ${PRIORTUNE_CUBLASLT:-not found}"
fi
set +e
PRIORTUNE_ADDON="$PWD/build/Release/priortune.node" /tmp/node .carry/gpu-check.mjs "$@" 2>&1 | tee "$out/gpu-check.log"
status=${PIPESTATUS[0]}
set -e
[ "${PEERS:-1}" = "0" ] && exit "$status"
for f in gpu_peer.py gpu_peer_llama.py; do
  if [ -f ".carry/$f" ]; then PYTHONUNBUFFERED=1 timeout 240 python3 ".carry/$f" 2>&1 | tee "$out/${f%.py}.jsonl" || true; fi
done
exit "$status"
