"""DeepSpeed ZeRO-2/3, two CPU processes (gloo; started as torchrun starts them, forked by tests/forkrun.py): full and
LoRA fine-tuning of the tiny Qwen2.

The final output must be plain Hugging Face files that load where DeepSpeed is not installed, hold complete trained
tensors (not ZeRO-3's empty local shards), and equal the state recovered independently from the last DeepSpeed
checkpoint with deepspeed's own zero_to_fp32.
"""

import json
import subprocess
import sys
from pathlib import Path

import forkrun
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "sharegpt.json"
STEPS = 3
LORA_R = 8

# Runs in a fresh interpreter in which `import deepspeed` fails and find_spec("deepspeed") is None, as on a machine
# without it. Writes the loaded model's state dict and its logits on a short prompt.
LOADER = r"""
import importlib.util, sys
sys.modules["deepspeed"] = None
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

base, out, mode, dump = sys.argv[1:]
assert importlib.util.find_spec("deepspeed") is None
model = AutoModelForCausalLM.from_pretrained(out if mode == "full" else base)
if mode == "lora":
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, out)
model.eval()
ids = torch.tensor([[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]])
tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
with torch.no_grad():
    tensors["@logits"] = model(input_ids=ids).logits
    if mode == "lora":
        with model.disable_adapter():
            tensors["@base_logits"] = model(input_ids=ids).logits
assert sys.modules["deepspeed"] is None
save_file(tensors, dump)
"""


def train(model_dir: Path, out: Path, stage: int, mode: str, cache: Path) -> None:
    args = [
        "finetune.py", "--model_name_or_path", str(model_dir), "--data_path", str(DATA), "--output_dir", str(out),
        "--deepspeed", f"ds_configs/zero{stage}.json", "--use_cpu", "True", "--max_steps", str(STEPS),
        "--save_strategy", "steps", "--save_steps", str(STEPS), "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--preview_data", "0",
        "--data_cache_dir", str(cache), "--seed", "0",
    ]
    if mode == "lora":
        args += ["--use_lora", "--lora_r", str(LORA_R)]
    proc = forkrun.torchrun(args)
    assert proc.returncode == 0, proc.stderr[-4000:]


def load_without_deepspeed(model_dir: Path, out: Path, mode: str, dump: Path) -> dict[str, torch.Tensor]:
    proc = subprocess.run([sys.executable, "-c", LOADER, str(model_dir), str(out), mode, str(dump)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(str(dump))


def recovered_from_checkpoint(checkpoint: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_deepspeed_saves_plain_trained_weights(stage, mode, model_dirs, tmp_path):
    model_dir = model_dirs("qwen2")
    out = tmp_path / "out"
    train(model_dir, out, stage, mode, tmp_path / "cache")
    plan = json.loads((out / "run_report.json").read_text())["plan"]
    assert (plan["processes"], plan["steps"], plan["deepspeed"]) == (2, STEPS, f"ds_configs/zero{stage}.json")

    base = load_file(str(model_dir / "model.safetensors"))
    recovered = recovered_from_checkpoint(out / f"checkpoint-{STEPS}")
    loaded = load_without_deepspeed(model_dir, out, mode, tmp_path / "loaded.safetensors")

    if mode == "full":
        saved = load_file(str(out / "model.safetensors"))
        # The output layer is tied to the embeddings. Under ZeRO-2 the Trainer hands save_pretrained a state dict
        # whose tied tensors no longer share storage, so lm_head.weight is written too: a copy, tied again on load.
        if "lm_head.weight" in saved:
            assert stage == 2 and torch.equal(saved.pop("lm_head.weight"), saved["model.embed_tokens.weight"])
        assert set(saved) == set(base)
        for name, before in base.items():
            assert saved[name].shape == before.shape, name  # complete tensors, not empty ZeRO-3 shards
            assert not torch.equal(saved[name], before), f"{name} did not train"
            close(saved[name], recovered[name])
            assert torch.equal(loaded[name], saved[name])
    else:
        saved = load_file(str(out / "adapter_model.safetensors"))
        # zero_to_fp32 names the trainable parameters as in the PeftModel (adapter name included); the adapter file
        # leaves the adapter name out
        trained = {name.replace(".default.", "."): t for name, t in recovered.items()}
        assert set(saved) == set(trained) and len(saved) == 2 * 7 * 2  # A and B, 7 linear layers, 2 layers
        for name, tensor in saved.items():
            assert tensor.numel() > 0 and tensor.shape == trained[name].shape, name
            assert LORA_R in tensor.shape
            close(tensor, trained[name])
            assert torch.equal(loaded[name.replace(".weight", ".default.weight")], tensor)
            if "lora_B" in name:
                assert tensor.abs().max() > 0, f"{name} is still at its zero initialization"
        for name, tensor in loaded.items():  # the frozen base under the adapter is the base model
            base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if base_name in base:
                assert torch.equal(tensor, base[base_name]), name
        assert not torch.allclose(loaded["@logits"], loaded["@base_logits"], atol=1e-4)


@pytest.mark.slow
def test_zero3_lora_auto_trains_the_embeddings_of_never_trained_control_tokens(model_dirs, tmp_path):
    """A base model whose <|im_start|>/<|im_end|> embeddings were never trained (zero rows, as in base checkpoints):
    under ZeRO-3 the partitioned embedding is read gathered, so `--lora_modules_to_save auto` still trains the
    embeddings and output layer instead of claiming the tokens are trained."""
    import shutil

    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(model_dirs("qwen2"), base)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.get_input_embeddings().weight[[151644, 151645]] = 0
    model.save_pretrained(base)
    out = tmp_path / "out"
    train(base, out, 3, "lora", tmp_path / "cache")
    plan = json.loads((out / "run_report.json").read_text())["plan"]
    assert plan["modules_to_save"] == "auto: the base model never learned <|im_start|>, <|im_end|>"
    saved = load_file(str(out / "adapter_model.safetensors"))
    embed = next(t for name, t in saved.items() if "embed_tokens" in name)
    assert embed.shape == (151936, 64)  # the whole trained embedding, gathered, not an empty ZeRO-3 shard
    assert embed[[151644, 151645]].abs().sum() > 0  # the zero rows trained


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_zero3_early_stopping_saves_the_best_checkpoint(mode, model_dirs, tmp_path):
    """--val_size with --early_stopping_patience under ZeRO-3 on two processes: the held-out split is made once and
    evaluated, training stops when the held-out loss turns up, and the saved model is the best checkpoint's (as
    recovered from its DeepSpeed shards by zero_to_fp32), not the last one's."""
    out = tmp_path / "out"
    args = [
        "finetune.py", "--model_name_or_path", str(model_dirs("qwen2")), "--data_path", str(DATA),
        "--output_dir", str(out), "--deepspeed", "ds_configs/zero3.json", "--use_cpu", "True", "--max_steps", "12",
        "--save_steps", "1", "--per_device_train_batch_size", "1", "--logging_steps", "1", "--report_to", "none",
        "--preview_data", "0", "--data_cache_dir", str(tmp_path / "cache"), "--seed", "0", "--val_size", "0.25",
        "--early_stopping_patience", "2", "--learning_rate", "0.3" if mode == "lora" else "0.1",
    ] + (["--use_lora", "--lora_r", str(LORA_R)] if mode == "lora" else [])
    proc = forkrun.torchrun(args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("held out 3 of 13 conversations") == 1  # logged (and copied) by process 0 only
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
    best = Path(state["best_model_checkpoint"])
    assert state["global_step"] < 12 and best.name != f"checkpoint-{state['global_step']}", evals
    recovered = recovered_from_checkpoint(best)
    if mode == "lora":
        saved = load_file(str(out / "adapter_model.safetensors"))
        recovered = {name.replace(".default.", "."): t for name, t in recovered.items()}
    else:
        saved = load_file(str(out / "model.safetensors"))
    assert saved and set(saved) <= set(recovered)
    for name, tensor in saved.items():
        close(tensor, recovered[name].to(tensor.dtype))
    last = {name.replace(".default.", "."): t
            for name, t in recovered_from_checkpoint(out / f"checkpoint-{state['global_step']}").items()}
    assert any(not torch.allclose(tensor, last[name].to(tensor.dtype)) for name, tensor in saved.items())
    assert (out / "val.jsonl").exists() and (out / "loss.png").exists()


@pytest.mark.slow
def test_zero3_lora_on_moe_saves_every_expert_whole_as_one_process_trains_it(model_dirs, tmp_path):
    """DeepSeek-V2 (dense first layer, shared and routed experts): the adapter two ZeRO-3 processes save holds every
    tensor at its full shape (a partitioned save would keep 1/world_size of each expert's lora_B), equal to the
    adapter one process trains on the same steps."""
    model_dir = model_dirs("deepseek_v2")
    zero3, alone = tmp_path / "zero3", tmp_path / "alone"
    train(model_dir, zero3, 3, "lora", tmp_path / "cache")
    one = ["finetune.py", "--model_name_or_path", str(model_dir), "--data_path", str(DATA),
           "--output_dir", str(alone), "--use_cpu", "True", "--max_steps", str(STEPS), "--save_strategy", "no",
           "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--report_to", "none",
           "--preview_data", "0", "--data_cache_dir", str(tmp_path / "cache"), "--seed", "0", "--use_lora",
           "--lora_r", str(LORA_R)]
    proc = forkrun.run(one)
    assert proc.returncode == 0, proc.stderr[-4000:]
    plans = [json.loads((d / "run_report.json").read_text())["plan"] for d in (zero3, alone)]
    assert plans[0]["adapters"] == plans[1]["adapters"]  # counted at full size, not as ZeRO-3's empty shards
    saved, reference = (load_file(str(d / "adapter_model.safetensors")) for d in (zero3, alone))
    assert set(saved) == set(reference)
    kinds = {n.split(".lora_")[0].split("layers.")[1] for n in saved}
    assert {"0.mlp.gate_proj", "1.mlp.shared_experts.down_proj", "1.mlp.experts", "1.mlp.experts.base_layer"} <= kinds
    for name, tensor in saved.items():
        assert tensor.shape == reference[name].shape, name
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)
        if "lora_B" in name:
            assert tensor.abs().max() > 0, f"{name} is still at its zero initialization"
