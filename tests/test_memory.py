"""The memory planner: parameter counts from configs, literal arithmetic, and the measured H100 anchors."""

import pytest
from transformers import Qwen2Config

from chattune.memory import GB, ModelShape, Setup, cheapest_fix, estimate, shape_from_config

QWEN25_7B = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def qwen7b():
    return shape_from_config(QWEN25_7B)


def test_parameter_count_matches_the_published_size(qwen7b):
    assert round(qwen7b.total / 1e9, 2) == 7.62  # Qwen2.5-7B: 7.61B parameters (7.62 with biases and norms)
    assert qwen7b.embedding_params == 2 * 152064 * 3584
    # r=1 LoRA on every decoder linear layer: in + out features summed
    per_layer = (3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 3 * (3584 + 18944)
    assert qwen7b.lora_params_per_rank == 28 * per_layer


def test_literal_arithmetic_full_without_deepspeed():
    shape = ModelShape(linear_params=10**9, embedding_params=0, other_params=0, hidden_size=1000,
                       intermediate_size=4000, num_layers=10, vocab_size=1000, lora_params_per_rank=0)
    parts = estimate(shape, Setup(mode="full", micro_batch_tokens=1000, gradient_checkpointing=False, fused_ce=False))
    assert parts["weights"] == parts["gradients"] == 4e9 and parts["optimizer"] == 8e9  # fp32 + Adam
    assert parts["activations"] == 1000 * 10 * (8 * 1000 + 4 * 4000) * 2
    assert parts["logits"] == 1000 * 1000 * 10
    zero3 = estimate(shape, Setup(mode="full", gpus=4, zero_stage=3, micro_batch_tokens=1000))
    assert zero3["weights"] == 2e9 / 4 and zero3["optimizer"] == 12e9 / 4


# Measured peaks (H100, max_memory_allocated), DESIGN.md "Measured anchors": 7B Qwen2.5 shapes, r=64,
# packed 4096-token micro-batches, gradient checkpointing.
ANCHORS = [("lora", False, 25.0), ("lora", True, 18.6), ("qlora", False, 16.0), ("qlora", True, 9.6)]


@pytest.mark.parametrize("mode,fused,measured_gb", ANCHORS)
def test_estimate_within_15_percent_of_measured_peaks(qwen7b, mode, fused, measured_gb):
    total = estimate(qwen7b, Setup(mode=mode, micro_batch_tokens=4096, fused_ce=fused))["total"] / GB
    assert abs(total - measured_gb) / measured_gb < 0.15, total


def test_verdicts_and_cheapest_changes(qwen7b):
    qlora = Setup(mode="qlora", micro_batch_tokens=4096)
    assert cheapest_fix(qwen7b, qlora, 24) is None
    full = Setup(mode="full", gpus=4, micro_batch_tokens=8192, gradient_checkpointing=False, fused_ce=False)
    assert cheapest_fix(qwen7b, full, 80) == ("--gradient_checkpointing True, --fused_ce auto, "
                                              "--deepspeed ds_configs/zero3.json")
    assert cheapest_fix(qwen7b, Setup(mode="full", micro_batch_tokens=4096), 24) == (
        "1024-token micro-batches (x4 gradient accumulation), --use_lora")
    assert cheapest_fix(qwen7b, Setup(mode="full", micro_batch_tokens=4096), 8) == (
        "does not fit even with Q-LoRA and small micro-batches: use more GPUs or a smaller model")


def test_cli_estimate_memory_needs_no_weights(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    QWEN25_7B.save_pretrained(tmp_path)  # config only: no weights exist
    proc = subprocess.run([sys.executable, "finetune.py", "--model_name_or_path", str(tmp_path), "--output_dir",
                           str(tmp_path / "o"), "--estimate_memory", "--use_lora", "--q_lora", "--bf16", "True",
                           "--model_max_length", "4096", "--per_device_train_batch_size", "1"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "7.62B parameters, qlora, 1 GPU(s)" in proc.stdout
    # without gradient checkpointing (the flag's default) a 24 GB card needs it: the verdict names the change
    assert "24 GB card: does not fit; cheapest changes: --gradient_checkpointing True" in proc.stdout
    assert "40 GB card: fits" in proc.stdout
