#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no Node.js (the lent device machines).
#
#   bash scripts/gpu-check.sh --prepare [peers-dir]   here: node and the addon (xz), the bundled check, the
#                                                      PyTorch peers go to .carry/ (ignored by git); carry .carry
#   bash scripts/gpu-check.sh [groups...]              there: runs the groups in order, each in its own process
#                                                      (sections of the check: wgmma tma async checks gemm steps
#                                                      generate knn, a group joining them with commas; "peers":
#                                                      the PyTorch peers, Llama's first; default: wgmma tma
#                                                      async knn steps peers gemm checks generate). wgmma runs with
#                                                      PRIORTUNE_CUDA_TMA=0 and PRIORTUNE_CUDA_ATTN_ASYNC=0,
#                                                      tma with the latter; when wgmma, tma or async fails, the
#                                                      groups after it run with PRIORTUNE_CUDA_WGMMA=0,
#                                                      PRIORTUNE_CUDA_TMA=0 or PRIORTUNE_CUDA_ATTN_ASYNC=0.
#                                                      PEERS=0 skips the peers; PROFILE=1 adds ncu on the kNN
#                                                      and GEMM kernels at the end.
#
# Each group runs under a time limit, all within BUDGET_S seconds (default 540; give the device call's
# timeout_s at least BUDGET_S + 30), and the groups before the peers leave them PEER_RESERVE_S (default 200,
# at most half of BUDGET_S) so that the ratios always have their peer. What finished is kept: the check
# appends each table to results.md as its section ends, and a section stopped by its time limit writes the
# rows it has. After all groups (peers included; before PROFILE's), whatever the budget left, the same-call
# ratio table (`gpu-check.mjs ratios`, under a second: priortune's step and kNN rows against the peers' rows
# of this call, from the logs' JSON lines) goes at the end of results.md. The exit status is 0 only when
# every group ran and passed (one not run for want of budget counts as a failure; the peers' own exit status
# does not count); without a usable CUDA device the first group says why in results.md and the others are
# skipped. $OUT (or
# ./gpu-results) receives four files, within the device tool's eight: summary.txt (GPU, each group's exit
# status and time), results.md (the tables), logs.tar.gz (every group's full log, refreshed after each), and
# whatever the caller redirects there (console.log).
#
# The addon is the one built here (build/Release/priortune.node: nvcc compiles sm_80 and sm_90a, the CUDA
# runtime is static), so nothing is compiled there; it is unpacked to /tmp/gpu-check-addon (PRIORTUNE_ADDON).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  peers="${2:-../shared/peers}"
  mkdir -p .carry
  # Node and the addon go stripped (symbols only: node's debug info is 12 MB) and compressed: a device call
  # carries at most 64 MiB with the working tree, checked below.
  tmp="$(mktemp -d)"
  cp "$(command -v node)" "$tmp/node"
  cp build/Release/priortune.node "$tmp/priortune.node"
  strip "$tmp/node" 2>/dev/null || echo "note: strip failed; node goes unstripped"
  strip --strip-unneeded "$tmp/priortune.node" 2>/dev/null || echo "note: strip failed; the addon goes unstripped"
  "$tmp/node" -e "require('$tmp/priortune.node')" # both still load
  xz -6 -T2 -c "$tmp/node" > .carry/node.xz
  xz -6 -T2 -c "$tmp/priortune.node" > .carry/priortune.node.xz
  rm -rf "$tmp"
  npx esbuild scripts/gpu-check.ts --bundle --platform=node --format=esm --outfile=.carry/gpu-check.mjs \
    --external:*.node --minify-whitespace --minify-syntax --log-level=warning
  for f in gpu_peer.py gpu_peer_llama.py; do
    if [ -f "$peers/$f" ]; then cp -f "$peers/$f" .carry/ && chmod u+w ".carry/$f"; else echo "note: no $peers/$f (the peer runs are skipped)"; fi
  done
  # What a device call sends: tracked and untracked-not-ignored files, and .carry.
  sent=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null |
    awk '$2 == "total" { s += $1 } END { print s + 0 }')
  sent=$(( sent + $(du -sb .carry | cut -f1) ))
  echo "prepared .carry/ ($(du -sh .carry | cut -f1)); carry: .carry; a device call sends $(( sent >> 20 )) of its 64 MiB"
  if [ "$sent" -gt $(( 64 << 20 )) ]; then
    echo "too large for a device call: build the addon for sm_90a alone (PRIORTUNE_CUDA_ARCHITECTURES=90a-real)" >&2
    exit 1
  fi
  exit 0
fi

out="${OUT:-gpu-results}"
logs=/tmp/gpu-check-logs  # tarred into $out/logs.tar.gz after each group (the device tool returns 8 files)
# A fresh log folder: a rerun on a warm machine must not pack, or take ratios from, the last run's logs.
rm -rf "$logs"
mkdir -p "$out" "$logs"
budget=${BUDGET_S:-540}
deadline=$(( $(date +%s) + budget ))
reserve=0  # seconds the groups before the peers leave them (set below)
xz -dc .carry/node.xz > /tmp/node && chmod +x /tmp/node
# The carried addon goes to /tmp, not build/Release: the working tree's own build (where the check is tried
# without a GPU, or a build is running) is left alone. Without one, the tree's build/Release is used.
export PRIORTUNE_ADDON="$PWD/build/Release/priortune.node"
if [ -f .carry/priortune.node.xz ]; then
  mkdir -p /tmp/gpu-check-addon
  xz -dc .carry/priortune.node.xz > /tmp/gpu-check-addon/priortune.node
  export PRIORTUNE_ADDON=/tmp/gpu-check-addon/priortune.node
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$out/summary.txt" || true
# cuBLASLt for the GEMM comparison: PyTorch's wheels carry one outside the loader path (none: ours alone).
if [ -z "${PRIORTUNE_CUBLASLT:-}" ]; then
  roots="/usr/local/cuda /usr/lib /opt $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)"
  PRIORTUNE_CUBLASLT="$(find $roots -name 'libcublasLt.so*' -type f 2>/dev/null | sort -r | head -1 || true)"
  export PRIORTUNE_CUBLASLT
  echo "cuBLASLt: ${PRIORTUNE_CUBLASLT:-not found}"
fi
# The checks read test/fixtures next to the bundle (test/helpers.ts resolves them from its own location).
ln -sfn ../test/fixtures .carry/fixtures

status=0
last_rc=0   # the exit status of part's last command
nodevice=0  # set when a group found no usable CUDA device (gpu-check.mjs exit 2): the other groups are skipped
# part NAME CAP COMMAND...: runs COMMAND for at most CAP seconds (less when the budget, less the peers'
# reserve, is nearly spent), its output to $logs/NAME.log (and the console); the exit status and the time
# taken go to summary.txt, the logs to $out/logs.tar.gz. A part the budget leaves no time for is not run,
# and that sets the exit status (status=1): a run that skipped a part did not check everything.
part() {
  local name=$1 cap=$2 left start rc
  shift 2
  left=$(( deadline - reserve - 10 - $(date +%s) ))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 15 ]; then
    echo "$name: not run (budget spent)" | tee -a "$out/summary.txt"
    status=1
    return 0
  fi
  echo "== $name (at most ${cap}s)"
  start=$(date +%s)
  set +e
  timeout -k 5 "$cap" "$@" 2>&1 | tee "$logs/$name.log"
  rc=${PIPESTATUS[0]}
  last_rc=$rc
  set -e
  echo "$name: exit $rc after $(( $(date +%s) - start ))s$(case $rc in 124 | 137) echo ' (time limit)' ;; esac)" |
    tee -a "$out/summary.txt"
  tar -czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null || true
  return "$rc"
}

# peers: the PyTorch peers in the same call (Llama's first: the step where PyTorch leads), unless PEERS=0.
peers() {
  [ "${PEERS:-1}" = "0" ] && return 0
  export PYTHONUNBUFFERED=1
  for f in gpu_peer_llama.py gpu_peer.py; do
    cap=170
    [ "$f" = gpu_peer_llama.py ] && cap=110
    if [ -f ".carry/$f" ]; then part "${f%.py}" "$cap" python3 ".carry/$f" || true; fi
  done
}

groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(wgmma tma async knn steps peers gemm checks generate)
case " ${groups[*]} " in *" peers "*) ;; *) groups+=(peers) ;; esac  # the ratios need their peer
# The peers' reserve, at most half the budget: a short BUDGET_S still runs some of our groups.
if [ "${PEERS:-1}" != "0" ]; then
  reserve=${PEER_RESERVE_S:-200}
  [ "$reserve" -gt $(( budget / 2 )) ] && reserve=$(( budget / 2 ))
fi
for g in "${groups[@]}"; do
  if [ "$g" = peers ]; then
    reserve=0
    peers
    continue
  fi
  if [ "$nodevice" = 1 ]; then
    echo "priortune-${g//,/-}: not run (no usable CUDA device)" | tee -a "$out/summary.txt"
    continue
  fi
  case "$g" in wgmma | tma | async) cap=60 ;; checks) cap=100 ;; *steps*) cap=240 ;; *knn*) cap=150 ;; *) cap=90 ;; esac
  # The wgmma group runs without the TMA-fed kernel and the cp.async attention kernels (none yet run on a
  # GPU), which the tma and async groups check next; tma runs without the attention ones.
  tma_env=()
  [ "$g" = wgmma ] && tma_env=(env PRIORTUNE_CUDA_TMA=0 PRIORTUNE_CUDA_ATTN_ASYNC=0)
  [ "$g" = tma ] && tma_env=(env PRIORTUNE_CUDA_ATTN_ASYNC=0)
  if ! part "priortune-${g//,/-}" "$cap" ${tma_env[@]+"${tma_env[@]}"} /tmp/node .carry/gpu-check.mjs ${g//,/ } \
    --results "$out/results.md"; then
    status=1
    if [ "$last_rc" = 2 ]; then
      # gpu-check.mjs found no usable CUDA device (results.md says why): the other groups would say the same.
      nodevice=1
    # A Hopper kernel failed, faulted or hung on its own: keep it out of the groups that follow.
    elif [ "$g" = wgmma ]; then
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
# The same-call ratio table, whatever the budget left (it reads the logs: under a second) and never failing
# the run: priortune's step and kNN rows against the peers' rows of this call ($logs/gpu_peer*.log).
rc=0
timeout -k 5 60 /tmp/node .carry/gpu-check.mjs ratios --logs "$logs" --results "$out/results.md" \
  >"$logs/ratios.log" 2>&1 || rc=$?
cat "$logs/ratios.log" 2>/dev/null || true
[ "$rc" = 0 ] || echo "ratios: exit $rc (ratios.log in logs.tar.gz)" | tee -a "$out/summary.txt" || true
tar -czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null || true
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
    # Unlocked clocks and warm caches, as in the unprofiled runs (ncu's defaults lock base clocks and flush).
    part ncu-knn-kernels 90 "$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum \
      /tmp/node .carry/gpu-check.mjs knn --quick || true
    part ncu-knn 90 "$ncu" -k regex:knn_select --launch-skip 1 --launch-count 1 "${secs[@]}" \
      /tmp/node .carry/gpu-check.mjs knn --quick || true
    part ncu-gemm 90 "$ncu" -k 'regex:gemm_(wg)?mma_kernel' --launch-count 1 "${secs[@]}" /tmp/node .carry/gpu-check.mjs gemm || true
  fi
fi
cat "$out/summary.txt"
exit "$status"
