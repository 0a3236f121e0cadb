#!/usr/bin/env bash
# Q-LoRA (4-bit NF4 base) on every GPU of this node (or of all nodes), DeepSpeed ZeRO-2. Options: -h
description="Q-LoRA: LoRA on a 4-bit NF4 (or GPTQ int4) base, DeepSpeed ZeRO-2, every GPU of every node (torchrun)."
mode=qlora launcher=torchrun deepspeed_default=zero2.json
# shellcheck source=finetune/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
launch "$FINETUNE" "${DEFAULTS[@]}" --use_lora True --q_lora True "${DEEPSPEED_FLAGS[@]}" "$@"
