#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no Node.js (the lent device machines).
#
#   bash scripts/gpu-check.sh --prepare [peers-dir]   here: node and the addon (xz), the bundled check, the
#                                                      PyTorch peers go to .carry/ (ignored by git); carry .carry
#   bash scripts/gpu-check.sh [groups...]              there: runs the check, one process per group of sections
#                                                      (sections: wgmma tma async checks gemm steps knn; a
#                                                      group joins them with commas; default: wgmma tma async
#                                                      checks gemm,steps knn; wgmma runs with
#                                                      PRIORTUNE_CUDA_TMA=0 and PRIORTUNE_CUDA_ATTN_ASYNC=0,
#                                                      tma with the latter; when wgmma, tma or async fails,
#                                                      the groups after it run with PRIORTUNE_CUDA_WGMMA=0,
#                                                      PRIORTUNE_CUDA_TMA=0 or PRIORTUNE_CUDA_ATTN_ASYNC=0),
#                                                      then the PyTorch
#                                                      peers (PEERS=0 skips them), then with PROFILE=1 ncu
#                                                      on the kNN and GEMM kernels; logs, results.md and
#                                                      summary.txt in $OUT (or ./gpu-results)
#
# Each group runs in its own process (a kernel fault that poisons the CUDA context stops only its group) under
# a time limit, all within BUDGET_S seconds (default 540) so that a lent machine's slot is never overrun: what
# finished is kept, what ran out of time is named in summary.txt.
#
# The addon is the one built here (build/Release/priortune.node: nvcc compiles sm_80 and sm_90a, the CUDA
# runtime is static), so nothing is compiled there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  peers="${2:-../shared/peers}"
  mkdir -p .carry
  xz -6 -c "$(command -v node)" > .carry/node.xz
  # The addon goes compressed too (a device call carries at most 64 MiB with the working tree).
  xz -6 -c build/Release/priortune.node > .carry/priortune.node.xz
  npx esbuild scripts/gpu-check.ts --bundle --platform=node --format=esm --outfile=.carry/gpu-check.mjs \
    --external:*.node --log-level=warning
  for f in gpu_peer.py gpu_peer_llama.py; do
    if [ -f "$peers/$f" ]; then cp -f "$peers/$f" .carry/ && chmod u+w ".carry/$f"; else echo "note: no $peers/$f (the peer runs are skipped)"; fi
  done
  echo "prepared .carry/ ($(du -sh .carry | cut -f1)); carry: .carry"
  exit 0
fi

out="${OUT:-gpu-results}"
mkdir -p "$out"
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
xz -dc .carry/node.xz > /tmp/node && chmod +x /tmp/node
if [ -f .carry/priortune.node.xz ]; then mkdir -p build/Release && xz -dc .carry/priortune.node.xz > build/Release/priortune.node; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt" || true
# cuBLASLt for the GEMM comparison: PyTorch's wheels carry one outside the loader path (none: ours alone).
if [ -z "${PRIORTUNE_CUBLASLT:-}" ]; then
  roots="/usr/local/cuda /usr/lib /opt $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)"
  PRIORTUNE_CUBLASLT="$(find $roots -name 'libcublasLt.so*' -type f 2>/dev/null | sort -r | head -1 || true)"
  export PRIORTUNE_CUBLASLT
  echo "cuBLASLt: ${PRIORTUNE_CUBLASLT:-not found}"
fi
export PRIORTUNE_ADDON="$PWD/build/Release/priortune.node"
# The checks read test/fixtures next to the bundle (test/helpers.ts resolves them from its own location).
ln -sfn ../test/fixtures .carry/fixtures

status=0
# part NAME CAP COMMAND...: runs COMMAND for at most CAP seconds (less when the budget is nearly spent), its
# output to $out/NAME.log; the exit status and the time taken go to summary.txt.
part() {
  local name=$1 cap=$2 left start rc
  shift 2
  left=$(( deadline - $(date +%s) ))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 15 ]; then
    echo "$name: not run (budget spent)" | tee -a "$out/summary.txt"
    return
  fi
  echo "== $name (at most ${cap}s)"
  start=$(date +%s)
  set +e
  timeout -k 5 "$cap" "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  echo "$name: exit $rc after $(( $(date +%s) - start ))s$([ "$rc" = 124 ] && echo ' (time limit)')" | tee -a "$out/summary.txt"
  return "$rc"
}

groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(wgmma tma async checks gemm,steps knn)
for g in "${groups[@]}"; do
  case "$g" in wgmma | tma | async) cap=60 ;; checks) cap=100 ;; *steps*) cap=300 ;; *knn*) cap=180 ;; *) cap=90 ;; esac
  # The wgmma group runs without the TMA-fed kernel and the cp.async attention kernels (none yet run on a
  # GPU), which the tma and async groups check next; tma runs without the attention ones.
  tma_env=()
  [ "$g" = wgmma ] && tma_env=(env PRIORTUNE_CUDA_TMA=0 PRIORTUNE_CUDA_ATTN_ASYNC=0)
  [ "$g" = tma ] && tma_env=(env PRIORTUNE_CUDA_ATTN_ASYNC=0)
  if ! part "priortune-${g//,/-}" "$cap" ${tma_env[@]+"${tma_env[@]}"} /tmp/node .carry/gpu-check.mjs ${g//,/ } \
    --results "$out/results.md"; then
    status=1
    # A Hopper kernel failed, faulted or hung on its own: keep it out of the groups that follow.
    if [ "$g" = wgmma ]; then
      export PRIORTUNE_CUDA_WGMMA=0
      echo "wgmma failed: the groups after it run with PRIORTUNE_CUDA_WGMMA=0" | tee -a "$out/summary.txt"
    elif [ "$g" = tma ]; then
      export PRIORTUNE_CUDA_TMA=0
      echo "tma failed: the groups after it run with PRIORTUNE_CUDA_TMA=0" | tee -a "$out/summary.txt"
    elif [ "$g" = async ]; then
      export PRIORTUNE_CUDA_ATTN_ASYNC=0
      echo "async failed: the groups after it run with PRIORTUNE_CUDA_ATTN_ASYNC=0" | tee -a "$out/summary.txt"
    fi
  fi
done
if [ "${PEERS:-1}" != "0" ]; then
  export PYTHONUNBUFFERED=1
  for f in gpu_peer.py gpu_peer_llama.py; do
    cap=170
    [ "$f" = gpu_peer_llama.py ] && cap=150
    if [ -f ".carry/$f" ]; then part "${f%.py}" "$cap" python3 ".carry/$f" || true; fi
  done
fi
# PROFILE=1: Nsight Compute: every kernel's device time in a few default-path kNN searches (160 x 50257 x 768:
# where its time goes, screening GEMM, slab selection, finalize) into ncu-knn-kernels.log; then the slab
# selection and the default BF16 GEMM (wgmma on Hopper, else mma.sync), one launch each: speed of light,
# occupancy, launch statistics, warp stalls, memory; into ncu-knn.log and ncu-gemm.log.
if [ "${PROFILE:-0}" = "1" ]; then
  ncu="$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1 || true)"
  if [ -z "$ncu" ]; then
    echo "profile: no ncu on this machine" | tee -a "$out/summary.txt"
  else
    secs=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
      --section MemoryWorkloadAnalysis)
    part ncu-knn-kernels 90 "$ncu" --metrics gpu__time_duration.sum /tmp/node .carry/gpu-check.mjs knn --quick || true
    part ncu-knn 90 "$ncu" -k regex:knn_select --launch-skip 1 --launch-count 1 "${secs[@]}" \
      /tmp/node .carry/gpu-check.mjs knn --quick || true
    part ncu-gemm 90 "$ncu" -k 'regex:gemm_(wg)?mma_kernel' --launch-count 1 "${secs[@]}" /tmp/node .carry/gpu-check.mjs gemm || true
  fi
fi
cat "$out/summary.txt"
exit "$status"
