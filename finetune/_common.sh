# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154  # variables set by the wrapper (mode, launcher, ...) or used by it (DEFAULTS, ...)
# Shared by every finetune/*.sh wrapper (sourced, not run): options, the hyperparameter defaults, GPU/node discovery
# and the launch. A wrapper sets `mode` (full | lora | qlora), `launcher` (torchrun | python) and, for DeepSpeed,
# `deepspeed_default`, sources this file and runs
#     launch "$FINETUNE" "${DEFAULTS[@]}" <mode flags> "$@"
# The user's remaining arguments ("$@") come last, so any finetune.py flag can be added or override a default.
#
# Environment (all optional):
#   MODEL, DATA, OUTPUT_DIR     same as -m, -d, -o
#   GPUS_PER_NODE               processes per node (default: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`, else 1)
#   NNODES, NODE_RANK           nodes and this node's rank (default: SLURM_NNODES/SLURM_NODEID, else 1 and 0)
#   MASTER_ADDR, MASTER_PORT    rendezvous (default: first host of SLURM_JOB_NODELIST, else localhost; 6001)
#   PYTHON, TORCHRUN            interpreter and launcher (default python3, torchrun)
#   CHATTUNE_CPU=1              run on CPU: --use_cpu True, no bf16 (torchrun uses the gloo backend)
#   CHATTUNE_DRY_RUN=1          print the command instead of running it
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FINETUNE="$ROOT/finetune.py"
PYTHON="${PYTHON:-python3}"
TORCHRUN="${TORCHRUN:-torchrun}"

# ---------------------------------------------------------------------------------------------------------------------
# Hyperparameter defaults of all wrappers (Qwen's, sized for 24 GB cards: one for the single-GPU scripts, 4x RTX 3090
# for the _ds scripts). Gradient accumulation is derived so that a step sees about GLOBAL_BATCH samples.
# ---------------------------------------------------------------------------------------------------------------------
GLOBAL_BATCH=16
case "$mode" in
    full) learning_rate=1e-5 per_device_batch=1 ;;
    lora | qlora) learning_rate=3e-4 per_device_batch=2 ;;
    *) echo "_common.sh: unknown mode '$mode'" >&2; exit 2 ;;
esac
epochs=5
# Preference training (--stage dpo among the arguments): DPO's usual rates, far below SFT's (TRL's and LLaMA-Factory's
# examples: 5e-7 full, 5e-6 LoRA), and 3 epochs; GLOBAL_BATCH then counts pairs.
stage=sft previous=""
for arg in "$@"; do
    [[ "$previous" == --stage ]] && stage="$arg"
    [[ "$arg" == --stage=* ]] && stage="${arg#*=}"
    previous="$arg"
done
if [[ "$stage" == dpo ]]; then
    learning_rate=$([[ "$mode" == full ]] && echo 5e-7 || echo 5e-6)
    epochs=3
fi
hyperparameters=(
    --model_max_length 512
    --num_train_epochs "$epochs"
    --per_device_train_batch_size "$per_device_batch"
    --per_device_eval_batch_size 1
    --learning_rate "$learning_rate"
    --weight_decay 0.1
    --adam_beta2 0.95
    --warmup_steps 0.01  # transformers 5: a float below 1 is a ratio (Qwen passes --warmup_ratio 0.01)
    --lr_scheduler_type cosine
    --save_strategy steps
    --save_steps 1000
    --save_total_limit 10
    --logging_steps 1
    --report_to none
    --lazy_preprocess True
)

if [[ "${CHATTUNE_CPU:-0}" == 1 ]]; then
    device_flags=(--use_cpu True)
else
    device_flags=(--bf16 True)
fi

usage() {
    local ds_line=""
    if [[ -n "${deepspeed_default:-}" ]]; then
        ds_line="      --deepspeed CONFIG  DeepSpeed config (default ds_configs/$deepspeed_default; none: plain DDP)"$'\n'
    fi
    cat <<EOF
Usage: bash finetune/$(basename "$0") -m MODEL -d DATA [-o OUTPUT] [finetune.py flags...]

$description

  -m, --model MODEL     model directory or hub id (env MODEL)
  -d, --data DATA       training data: JSON/JSONL/parquet file(s), comma separated, or a folder (env DATA)
  -o, --output OUTPUT   output directory (env OUTPUT_DIR, default output_$mode)
${ds_line}  -h, --help            this help

Every other argument is passed to finetune.py after the defaults below, so it adds to them or overrides them,
e.g. --num_train_epochs 1 --lora_r 16 --model_max_length 2048.
Defaults: $(echo "${hyperparameters[*]} ${device_flags[*]}" | fold -s -w 100 | sed -e 's/ *$//' -e '2,$s/^/          /')
          --gradient_accumulation_steps: ~$GLOBAL_BATCH samples per optimizer step over all processes

Launch (environment): GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, or SLURM's variables under srun;
PYTHON, TORCHRUN; CHATTUNE_CPU=1 trains on CPU; CHATTUNE_DRY_RUN=1 prints the command instead of running it.
EOF
}

# ---------------------------------------------------------------------------------------------------------------------
# Options: -m/-d/-o (and --deepspeed) are taken out, everything else stays in "$@" for finetune.py.
# Sourced without arguments, so `set --` here sets the wrapper's "$@".
# ---------------------------------------------------------------------------------------------------------------------
MODEL="${MODEL:-}"
DATA="${DATA:-}"
OUTPUT_DIR="${OUTPUT_DIR:-output_$mode}"
DEEPSPEED="${deepspeed_default:+$ROOT/ds_configs/$deepspeed_default}"
passthrough=()
while [[ $# -gt 0 ]]; do
    if [[ "$1" == --*=* ]]; then  # --model=X
        option="${1%%=*}" value="${1#*=}" consumed=1
    else
        option="$1" value="${2-}" consumed=2
    fi
    case "$option" in
        -h | --help) usage; exit 0 ;;
        -m | --model | -d | --data | -o | --output | --deepspeed)
            if [[ "$option" == --deepspeed && -z "${deepspeed_default:-}" ]]; then
                passthrough+=("$1"); shift; continue  # single-process wrappers: finetune.py's own --deepspeed
            fi
            if [[ $consumed == 2 && ( $# -lt 2 || "$value" == -* ) ]]; then
                echo "$(basename "$0"): $option needs a value (see -h)" >&2; exit 2
            fi
            case "$option" in
                -m | --model) MODEL="$value" ;;
                -d | --data) DATA="$value" ;;
                -o | --output) OUTPUT_DIR="$value" ;;
                --deepspeed) DEEPSPEED="$value" ;;
            esac
            shift "$consumed" ;;
        *) passthrough+=("$1"); shift ;;
    esac
done
set -- ${passthrough[@]+"${passthrough[@]}"}
missing=()
[[ -n "$MODEL" ]] || missing+=("-m MODEL")
[[ -n "$DATA" ]] || missing+=("-d DATA")
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "$(basename "$0"): missing ${missing[*]} (or the environment variables MODEL, DATA); see -h" >&2
    exit 2
fi

# ---------------------------------------------------------------------------------------------------------------------
# Processes and nodes
# ---------------------------------------------------------------------------------------------------------------------
count_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        local ids
        IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
        return
    fi
    local n=0
    if command -v nvidia-smi > /dev/null 2>&1; then
        n=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)
    fi
    echo $((n > 0 ? n : 1))
}

GPUS_PER_NODE="${GPUS_PER_NODE:-$(count_gpus)}"
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2> /dev/null | head -n 1 || true)"
    if [[ -z "$MASTER_ADDR" && "$NNODES" != 1 ]]; then  # e.g. inside a container without SLURM's tools
        echo "$(basename "$0"): cannot read the first host of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" \
             "(scontrol show hostnames failed); set MASTER_ADDR" >&2
        exit 2
    fi
fi
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-6001}"
for name in GPUS_PER_NODE NNODES NODE_RANK MASTER_PORT; do
    if ! [[ "${!name}" =~ ^[0-9]+$ ]]; then
        echo "$(basename "$0"): $name=${!name} is not a number" >&2; exit 2
    fi
done

if [[ "$launcher" == torchrun ]]; then
    processes=$((GPUS_PER_NODE * NNODES))
else
    processes=1
fi
accumulation=$((GLOBAL_BATCH / (per_device_batch * processes)))
accumulation=$((accumulation > 0 ? accumulation : 1))

DEFAULTS=(
    --model_name_or_path "$MODEL"
    --data_path "$DATA"
    --output_dir "$OUTPUT_DIR"
    "${hyperparameters[@]}"
    --gradient_accumulation_steps "$accumulation"
)
DEFAULTS+=("${device_flags[@]}")
# The DeepSpeed config of the multi-process wrappers; `--deepspeed none` launches the same processes with plain DDP.
DEEPSPEED_FLAGS=()
if [[ -n "$DEEPSPEED" && "$DEEPSPEED" != none ]]; then
    DEEPSPEED_FLAGS=(--deepspeed "$DEEPSPEED")
fi

# GeForce RTX 30xx/40xx cards have no usable peer-to-peer over PCIe: NCCL hangs or fails without this.
disable_p2p_on_consumer_cards() {
    [[ -z "${NCCL_P2P_DISABLE:-}" ]] || return 0
    command -v nvidia-smi > /dev/null 2>&1 || return 0
    local cards
    cards=$(nvidia-smi -L 2> /dev/null | grep -E 'GeForce RTX (30|40)[0-9]{2}' \
        | sed -E 's/^GPU [0-9]+: ([^(]*[^ (]).*/\1/' | sort -u | paste -sd, - || true)
    if [[ -n "$cards" ]]; then
        export NCCL_P2P_DISABLE=1
        echo "NCCL_P2P_DISABLE=1: $cards (consumer cards, no peer-to-peer over PCIe)" >&2
    fi
}

# Run the command (or print it under CHATTUNE_DRY_RUN=1). The first argument is finetune.py.
launch() {
    local command
    if [[ "$launcher" == torchrun ]]; then
        disable_p2p_on_consumer_cards
        command=("$TORCHRUN" --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
                 --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@")
        echo "launch: $GPUS_PER_NODE process(es) per node x $NNODES node(s), node rank $NODE_RANK," \
             "rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
    else
        if [[ "${CHATTUNE_CPU:-0}" != 1 ]]; then
            # One process on several visible GPUs would make the Trainer fall back to DataParallel: use the first.
            export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
            CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES%%,*}"
        fi
        command=("$PYTHON" "$@")
    fi
    if [[ "${CHATTUNE_DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "${command[@]}"
        printf '\n'
        return 0
    fi
    exec "${command[@]}"
}
