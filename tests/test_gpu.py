"""CUDA paths: Q-LoRA with bitsandbytes in bf16, the default packed path (flex_attention + fused loss), ZeRO-3 Q-LoRA.

Run on a GPU machine with `python -m pytest -m gpu`; skipped elsewhere.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "sharegpt.json"

pytestmark = pytest.mark.gpu


def cli(model_dir, out, *extra, launcher=()):
    cmd = [*launcher, str(ROOT / "finetune.py"), "--model_name_or_path", str(model_dir), "--data_path", str(DATA),
           "--output_dir", str(out), "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
           "--preview_data", "0", "--data_cache_dir", str(out.parent / "cache"), "--seed", "0", *map(str, extra)]
    if not launcher:
        cmd.insert(0, sys.executable)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(out):
    return [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_default_cuda_path_is_packed_flex_with_fused_loss(model_dirs, tmp_path):
    out = tmp_path / "lora"
    cli(model_dirs("qwen2"), out, "--use_lora", "--bf16", "True", "--max_steps", 12, "--learning_rate", 3e-2,
        "--per_device_train_batch_size", 2, "--model_max_length", 256)
    plan = json.loads((out / "run_report.json").read_text())["plan"]
    assert plan["batches"] == "packed, 512 tokens per micro-batch"
    assert plan["attention"] in ("flex_attention", "flash_attention_2")
    assert plan["loss"].startswith("fused linear+CE")
    loss = losses(out)
    assert all(torch.isfinite(torch.tensor(loss))) and loss[-1] < loss[0] - 1.0


def test_qlora_bf16_on_cuda_trains_and_reloads(model_dirs, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "qlora"
    cli(model_dirs("qwen2"), out, "--use_lora", "--q_lora", "--bf16", "True", "--max_steps", 12,
        "--learning_rate", 3e-2, "--per_device_train_batch_size", 2, "--gradient_checkpointing", "True")
    loss = losses(out)
    assert loss[-1] < loss[0] - 1.0
    report = json.loads((out / "run_report.json").read_text())
    assert report["plan"]["mode"] == "qlora" and report["peak_gpu_memory_gb"] > 0
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"), quantization_config=quant, device_map={"": 0})
    model = PeftModel.from_pretrained(base, out)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14
    ids = torch.tensor([[151644, 872, 198, 9707, 151645]], device="cuda")
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_zero3_on_cuda_saves_plain_adapter(model_dirs, tmp_path, mode):
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    out = tmp_path / f"zero3-{mode}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                str(free_port())]
    extra = ["--use_lora", "--bf16", "True", "--max_steps", 4, "--learning_rate", 1e-2, "--deepspeed",
             ROOT / "ds_configs" / "zero3.json", "--per_device_train_batch_size", 2]
    if mode == "qlora":
        extra.append("--q_lora")
    cli(model_dirs("qwen2"), out, *extra, launcher=launcher)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # ZeRO-3 must not save empty tensors
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    assert all(torch.isfinite(torch.tensor(losses(out))))
