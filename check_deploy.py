#!/usr/bin/env python
"""Check that the artifact you will serve behaves like the model you trained, on the run's held-out conversations.

    python check_deploy.py --run_dir output/qwen-lora                                  # the adapter itself
    python check_deploy.py --run_dir output/qwen-lora --model_path output/qwen-merged
    python check_deploy.py --run_dir output/qwen-lora --model_path output/qwen-gptq --max_loss_increase 0.05
    python check_deploy.py --run_dir output/qwen-lora --model_path output/qwen-gptq --engine vllm  # in vLLM

Checks, one line each (details in ARTIFACT/deploy_check.json):
  prompt   the artifact's saved tokenizer and chat template, used as an engine uses them (no template variables),
           give every held-out turn exactly the prompt ids training used
  stop     its generation_config stops on the trained end-of-turn tokens, and greedy generation does, within the
           reference answer's length + --stop_margin tokens, on --stop_samples turns
  quality  its loss on the held-out trained tokens against the trained model's (adapter on its base): within
           --max_merge_drift for a merged model, at most --max_loss_increase higher for a GPTQ model
With --engine vllm the artifact runs in vLLM's offline engine (the prompt as vLLM's chat path tokenizes it, vLLM's
stops, the loss from its prompt logprobs); the trained model's loss is always taken with transformers.
Exit code: 0 all passed, 1 a check failed, 2 bad input. The held-out conversations are the run's val.jsonl
(finetune.py --val_size), or --data_path.
"""

import argparse
import sys

from chattune.cli import main_guard


def parse_args(argv=None):
    from chattune.export.deploy import ENGINES, DeployArgs
    from chattune.export.merge import add_trust_remote_code_flag

    d = DeployArgs("")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_dir", required=True, help="output directory of the finetune.py run (chattune.json)")
    ap.add_argument("--model_path", default=None, help="the artifact to check: merged or GPTQ model, or an adapter "
                    "(default: the run's own output)")
    ap.add_argument("--data_path", default=None, help="conversations to check on (default: RUN_DIR/val.jsonl)")
    ap.add_argument("--max_loss_increase", type=float, default=d.max_loss_increase,
                    help="GPTQ: allowed relative increase of the held-out loss (default 0.05)")
    ap.add_argument("--max_merge_drift", type=float, default=d.max_merge_drift,
                    help="unquantized artifacts: allowed relative difference of the held-out loss (default 1e-3 in "
                    "float32, 1e-2 in bfloat16/float16)")
    ap.add_argument("--stop_samples", type=int, default=d.stop_samples, help="held-out turns generated (default 8)")
    ap.add_argument("--stop_margin", type=int, default=d.stop_margin,
                    help="tokens allowed beyond the reference answer before a turn counts as not stopping")
    ap.add_argument("--max_length", type=int, default=d.max_length,
                    help="tokens per held-out sample (default: the run's --model_max_length)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    ap.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16", "auto"],
                    help="dtype both models are compared in (default float32, which keeps rounding out of the "
                    "check; under --engine vllm the artifact runs as vllm serve runs it, 16-bit, and the trained model "
                    "in bfloat16, or float32 against a GPTQ model)")
    ap.add_argument("--engine", default=d.engine, choices=list(ENGINES),
                    help="what runs the artifact: transformers (as chat.py serves it; CPU or GPU), or vllm (vLLM's own "
                    "engine: its chat rendering, stops, kernels and quantized loading; needs vLLM and a CUDA GPU)")
    ap.add_argument("--gpu_memory_utilization", type=float, default=d.gpu_memory_utilization,
                    help="vllm: the share of the GPU memory its engine may take (default 0.5)")
    ap.add_argument("--report_path", default=None, help="where deploy_check.json goes (default: in the artifact)")
    add_trust_remote_code_flag(ap)
    args = vars(ap.parse_args(argv))
    return DeployArgs(**{**args, "trust_remote_code": args["trust_remote_code"] == "true"})


def main(argv=None) -> int:
    with main_guard():
        from chattune.export.deploy import main as check

        return check(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
