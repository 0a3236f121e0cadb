#!/usr/bin/env bash
# Full fine-tuning on every GPU of this node (or of all nodes), DeepSpeed ZeRO-3. Options: -h
description="Full fine-tuning of all weights, DeepSpeed ZeRO-3, every GPU of every node (torchrun)."
mode=full launcher=torchrun deepspeed_default=zero3.json
# shellcheck source=finetune/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
launch "$FINETUNE" "${DEFAULTS[@]}" "${DEEPSPEED_FLAGS[@]}" "$@"
