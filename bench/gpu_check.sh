#!/usr/bin/env bash
# Check a GPU machine for chattune in under 8 minutes: the installed versions against our pins, every CUDA path once
# against its reference (the gpu-marked tests), a full fine-tune end to end, two throughput rows and the MoE experts
# row. Every step runs under `timeout`, no step starts after DEADLINE, each step logs to its own file in one folder,
# and a table of the steps closes the run.
#
#   bash bench/gpu_check.sh [LOG_DIR]      # default: gpu_check_logs/<date-time>
#   DEADLINE=300 bash bench/gpu_check.sh   # seconds after which no new step starts (default 420)
#
# Exit status: 0 when every step that ran passed, 1 otherwise (no CUDA GPU included).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_logs/$(date +%Y%m%d-%H%M%S)}
DEADLINE=${DEADLINE:-420}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/chattune_inductor}  # kernels compile once per machine
t0=$(date +%s)
now() { echo $(( $(date +%s) - t0 )); }
rows=()
failed=0
cuda=unknown

step() {  # step LIMIT NAME CMD...: runs only if it can end before DEADLINE + 60 s
    local limit=$1 name=$2; shift 2
    if [ "$cuda" = no ] && [ "$name" != versions ] && [ "$name" != cuda ]; then
        rows+=("| $name | skipped: no CUDA GPU | - | - |"); return
    fi
    if [ $(( $(now) + limit )) -gt $(( DEADLINE + 60 )) ]; then
        rows+=("| $name | skipped: no time left (DEADLINE=$DEADLINE) | - | - |"); return
    fi
    local start rc result
    start=$(now)
    echo "[+${start}s] $name (at most ${limit}s)"
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) result=passed ;;
        124|137) result="timed out after ${limit}s"; failed=1 ;;
        *) result="FAILED (exit $rc): $(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-100 | tr '|' '/')"
           failed=1 ;;
    esac
    rows+=("| $name | $result | $(( $(now) - start )) | $OUT/$name.log |")
}

# 1. what is installed, against requirements.txt (and torch's CUDA build)
step 60 versions "$PY" - <<'EOF'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

bad = 0
for line in open("requirements.txt"):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        print(f"{req.name}: not installed (wants {req.specifier})"); bad += 1; continue
    ok = req.specifier.contains(have, prereleases=True)
    print(f"{req.name} {have}: {'ok' if ok else 'NOT ' + str(req.specifier)}"); bad += not ok
import torch
print("torch CUDA build:", torch.version.cuda, "| GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print(f"{bad} package(s) off our pins" if bad else "every package within our pins")
sys.exit(1 if bad else 0)
EOF

# 2. a CUDA GPU at all: without one the CUDA steps are skipped (and the check fails)
step 60 cuda "$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print(torch.cuda.get_device_name() if ok else 'no CUDA GPU'); sys.exit(0 if ok else 1)"
case "${rows[-1]}" in *"| passed |"*) cuda=yes ;; *FAILED*|*"timed out"*) cuda=no ;; esac

PYTEST=("$PY" -m pytest -p no:cacheprovider -q -m gpu)
# 3. kernels against references: packed flex/sdpa isolation, Qwen2.5 head layouts, Liger vs chunked vs own loss,
#    Q-LoRA's 4-bit MoE experts (bitsandbytes' CUDA kernels against its CPU code)
step 150 kernels "${PYTEST[@]}" tests/test_gpu.py tests/test_packing.py tests/test_moe_4bit.py \
    -k "isolation or head_layouts or liger_and_chunked or 4bit_experts_on_cuda"
# 4. finetune.py end to end on CUDA: full fine-tuning two steps against a reference, then the default path
step 170 full_finetune "${PYTEST[@]}" tests/test_gpu.py -k "full_finetune or default_cuda_path"
# 5. two throughput suites against Qwen's recipe (the anchors' budget, this GPU's defaults), each side in its own
#    process; --deadline ends the table inside the step's limit (a late side gets a "skipped" row, the rest print)
step 200 throughput "$PY" bench/throughput.py --runs full-1.5b,qlora-7b --steps 8 --warmup 3 --timeout 80 --deadline 185
# 6. MoE experts: grouped GEMM against the loop over experts, and Q-LoRA's 4-bit experts
step 120 experts "$PY" bench/experts.py --timeout 40
# 7. LoRA DPO against TRL's DPOTrainer (pip install -r requirements-bench.txt; without trl its row says so)
step 150 dpo "$PY" bench/dpo_vs_trl.py --shape 0.5b --steps 12 --warmup 3 --timeout 120

{
    echo "chattune GPU check, $(date '+%Y-%m-%d %H:%M'), $(now) s"
    echo "| step | result | seconds | log |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${rows[@]}"
    for name in throughput experts dpo; do
        [ -f "$OUT/$name.log" ] && { echo; grep '^|' "$OUT/$name.log" || true; }
    done
} | tee "$OUT/table.md"
[ "$cuda" = yes ] && [ "$failed" = 0 ]
