#!/usr/bin/env python
"""Quantize a merged model (or an adapter directory) to GPTQ 4 or 8 bits, calibrated on your own conversations.

    python run_gptq.py --model_name_or_path output/qwen-merged --data_path data.json \
        --out_path output/qwen-gptq-int4 --bits 4

The conversations are rendered with the training chat template, exactly as finetune.py renders them. A held-out set
(--eval_samples, never calibrated on; the run's own val.jsonl when the model carries one, from finetune.py
--val_size) measures perplexity over the assistant tokens before and after quantization;
the table is printed and written to OUT/gptq_report.json. OUT loads with AutoModelForCausalLM.from_pretrained (and
chat.py) as is: GPTQ weights, quantization_config in config.json, the tokenizer with its chat template, the
generation config (stop tokens) and chattune.json of the run. Needs the gptqmodel and optimum pins of
requirements.txt.
"""

import argparse
import sys

from chattune.cli import main_guard


def parse_args(argv=None):
    from chattune.export.gptq import GptqArgs

    defaults = GptqArgs("", "", "")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name_or_path", required=True,
                    help="merged/full model directory, or an adapter directory (folded into its base first)")
    ap.add_argument("--data_path", required=True,
                    help="your conversations, in any format finetune.py reads: calibration and held-out evaluation")
    ap.add_argument("--out_path", required=True, help="new (or empty) directory for the quantized model")
    ap.add_argument("--bits", type=int, default=defaults.bits, help="4 or 8")
    ap.add_argument("--group_size", type=int, default=defaults.group_size,
                    help="weights per quantization group along the input dimension; -1: one group per column")
    ap.add_argument("--num_samples", type=int, default=defaults.num_samples, help="calibration conversations")
    ap.add_argument("--max_len", type=int, default=defaults.max_len,
                    help="tokens per sample for calibration and evaluation (longer ones are cut)")
    ap.add_argument("--eval_samples", type=int, default=defaults.eval_samples,
                    help="held-out conversations for perplexity before/after (never calibrated on); 0: skip")
    ap.add_argument("--template", default=defaults.template,
                    help="chat template: auto (the tokenizer's own, as finetune.py saved it) or a built-in name")
    ap.add_argument("--dtype", default=defaults.dtype,
                    help="auto (the model's own) | bfloat16 | float16 | float32, for the float model and GPTQ")
    ap.add_argument("--device", default=defaults.device, help="auto (cuda when visible) | cpu | cuda")
    ap.add_argument("--seed", type=int, default=defaults.seed, help="seed of the held-out/calibration split")
    ap.add_argument("--skip_invalid_records", action="store_true",
                    help="drop invalid records (the count is reported) instead of stopping at them")
    ap.add_argument("--data_cache_dir", default=None, help="tokenized-data cache (default ~/.cache/chattune)")
    from chattune.export.merge import add_trust_remote_code_flag

    add_trust_remote_code_flag(ap)
    values = vars(ap.parse_args(argv))
    values["trust_remote_code"] = values["trust_remote_code"] == "true"
    return GptqArgs(**values)


def main(argv=None) -> int:
    args = parse_args(argv)
    with main_guard():
        from chattune.export.gptq import quantize

        report = quantize(args)
        print(report.format())
        print(f"quantized model saved to {args.out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
