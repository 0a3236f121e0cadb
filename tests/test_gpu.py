"""CUDA paths: Q-LoRA with bitsandbytes in bf16, the default packed path (flex_attention + fused loss), ZeRO-3 Q-LoRA.

Run on a GPU machine with `python -m pytest -m gpu`; skipped elsewhere.
"""

import json
import subprocess
import sys
from pathlib import Path

import forkrun
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
    launcher = forkrun.torchrun_command(free_port(), nproc=1)
    extra = ["--use_lora", "--bf16", "True", "--max_steps", 4, "--learning_rate", 1e-2, "--deepspeed",
             ROOT / "ds_configs" / "zero3.json", "--per_device_train_batch_size", 2]
    if mode == "qlora":
        extra.append("--q_lora")
    cli(model_dirs("qwen2"), out, *extra, launcher=launcher)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # ZeRO-3 must not save empty tensors
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    assert all(torch.isfinite(torch.tensor(losses(out))))


# --------------------------------------------------------------------------------------------------------------
# CUDA kernels against references (not only "loss went down")
# --------------------------------------------------------------------------------------------------------------


def _packed(lengths, seed=0, vocab=5000):
    from chattune.train.batches import PackingCollator

    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in lengths:
        ids = torch.randint(100, vocab, (n,), generator=g).tolist()
        parts.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return parts, PackingCollator()(parts)


def _cuda_kwargs(parts, attn):
    """position_ids (and flash-attention's cu_seq_lens) of the packed row, on the GPU."""
    from chattune.train.batches import PackingCollator

    batch = PackingCollator(boundaries=attn.startswith("flash"))(parts)
    return {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items() if k not in ("input_ids", "labels")}


def _attention_available(attn):
    import importlib.util

    if attn.startswith("flash") and not importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn not installed")


@pytest.mark.parametrize("attn", ["flex_attention", "flash_attention_2"])
def test_cuda_gradient_isolation_of_packed_samples(model_dirs, attn):
    """A loss on one packed sample gives exactly zero gradient to the other samples' input embeddings."""
    from transformers import AutoModelForCausalLM

    _attention_available(attn)
    m = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"), dtype=torch.bfloat16, attn_implementation=attn)
    m = m.cuda()
    m.config.use_cache = False
    parts, batch = _packed((40, 70, 33), seed=4)
    kwargs = _cuda_kwargs(parts, attn)
    embeds = m.get_input_embeddings()(batch["input_ids"].cuda()).detach().requires_grad_(True)
    logits = m(inputs_embeds=embeds, **kwargs).logits
    logits[0, 40:110].float().logsumexp(-1).sum().backward()
    grad = embeds.grad[0].float().abs().sum(-1)
    assert torch.all(grad[:40] == 0) and torch.all(grad[110:] == 0) and torch.all(grad[40:110] > 0)


@pytest.mark.parametrize("heads, kv_heads", [(12, 2), (28, 4)])  # Qwen2.5-1.5B and -7B layouts (GQA 6 and 7)
@pytest.mark.parametrize("attn", ["flex_attention", "flash_attention_2"])
def test_cuda_packed_attention_with_qwen25_head_layouts(attn, heads, kv_heads):
    """Non-power-of-two query heads per KV head (flex repeats KV then): packed rows equal each sample alone."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from chattune.train.hf import use_common_dtype_in_flex_attention

    _attention_available(attn)
    use_common_dtype_in_flex_attention()
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=16 * heads, intermediate_size=256, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=5000, use_cache=False, attn_implementation=attn)
    m = Qwen2ForCausalLM(config).to("cuda", torch.bfloat16).eval()
    parts, batch = _packed((64, 100, 29), seed=5)
    kwargs = _cuda_kwargs(parts, attn)
    with torch.no_grad():
        packed = m(input_ids=batch["input_ids"].cuda(), **kwargs).logits[0].float()
        start = 0
        for part in parts:
            n = len(part["input_ids"])
            alone = m(input_ids=torch.tensor([part["input_ids"]], device="cuda")).logits[0].float()
            error = (packed[start:start + n] - alone).norm() / alone.norm()
            assert error < 2e-2, (start, error.item())
            start += n


@pytest.mark.parametrize("master_dtype", [torch.float32, torch.bfloat16])
def test_cuda_liger_and_chunked_equal_the_models_own_loss_and_gradients(master_dtype):
    """Liger (the CUDA default), the chunked path and the model's own loss: same value, same gradients, under the
    bf16 autocast the Trainer uses (fp32 master weights: full fine-tuning) and in plain bf16 (LoRA bases)."""
    pytest.importorskip("liger_kernel")
    import transformers as tf

    from chattune.train.loss import LogitTransform, fused_loss_sum, trained_token_count

    _, batch = _packed((300, 500, 200), seed=6)
    results = {}
    for kind in ("own", "chunked", "liger"):
        torch.manual_seed(0)
        config = tf.Gemma2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=64, vocab_size=32000, final_logit_softcapping=5.0,
                                 use_cache=False, attn_implementation="eager")
        m = tf.Gemma2ForCausalLM(config).to("cuda", master_dtype)
        inputs = {k: v.cuda() for k, v in batch.items()}
        labels = inputs.pop("labels")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if kind == "own":
                loss = m(**inputs, labels=labels).loss
            else:
                hidden = m.model(**inputs).last_hidden_state
                loss = fused_loss_sum(kind, m.lm_head, hidden, labels, LogitTransform(softcap=5.0))
                loss = loss / trained_token_count(labels)
        loss.backward()
        results[kind] = (loss.item(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    own_loss, own_grads = results["own"]
    for kind in ("chunked", "liger"):
        loss, grads = results[kind]
        assert loss == pytest.approx(own_loss, rel=1e-2)
        for name, grad in own_grads.items():
            error = (grads[name] - grad).norm() / grad.norm().clamp(min=1e-8)
            assert error < 5e-2, (kind, name, error.item())


def test_cuda_full_finetune_with_flex_two_steps_matches_reference(model_dirs, tmp_path):
    """2 steps of full fine-tuning, packed, flex_attention, fused loss, fp32 master weights under bf16: the first
    logged loss is the model's own loss on the whole global batch, computed here."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full-flex"
    data = tmp_path / "eight.json"
    data.write_text(json.dumps(json.loads(DATA.read_text())[:8]))
    cache = tmp_path / "cache"
    cmd_common = ["--model_name_or_path", str(model_dirs("qwen2")), "--data_path", str(data), "--bf16", "True",
                  "--data_cache_dir", str(cache)]
    dump = tmp_path / "tokens.jsonl"
    subprocess.run([sys.executable, str(ROOT / "finetune.py"), *cmd_common, "--output_dir", str(tmp_path / "d"),
                    "--dump_tokenized", str(dump), "--preview_data", "0"], check=True, cwd=ROOT, capture_output=True)
    samples = [json.loads(line) for line in dump.read_text().splitlines()]
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), *cmd_common, "--output_dir", str(out),
                           "--max_steps", "2", "--learning_rate", "1e-5", "--logging_steps", "1", "--report_to",
                           "none", "--save_strategy", "no", "--preview_data", "0", "--max_tokens_per_batch", "8192",
                           "--model_max_length", "8192", "--gradient_accumulation_steps", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "run_report.json").read_text())
    assert report["plan"]["attention"] == "flex_attention" or report["plan"]["attention"].startswith("flash")
    assert report["plan"]["batches"].startswith("packed") and report["loss_path"] in ("liger", "chunked")
    model = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"), dtype=torch.float32).cuda()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for s in samples:
            logits = model(input_ids=torch.tensor([s["input_ids"]], device="cuda")).logits[0, :-1].float()
            target = torch.tensor(s["labels"][1:], device="cuda")
            keep = target != -100
            total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    assert losses(out)[0] == pytest.approx(total / count, rel=1e-2)  # one packed micro-batch holds all 8 samples
    assert all(torch.isfinite(torch.tensor(losses(out))))


def test_cuda_qlora_adapter_reload_reproduces_the_trained_logits(model_dirs, tmp_path):
    """The NF4 adapter, reloaded on a freshly quantized base, gives the trained model's logits (same quantization,
    same adapter)."""
    import subprocess as sp

    script = tmp_path / "reload.py"
    script.write_text(f'''
import json, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from chattune.train.args import parse_args
from chattune.train.run import run
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
trainer = run(*parse_args(["--model_name_or_path", {str(model_dirs("qwen2"))!r}, "--data_path", {str(DATA)!r},
    "--output_dir", {str(tmp_path / "out")!r}, "--use_lora", "--q_lora", "--bf16", "True", "--max_steps", "3",
    "--learning_rate", "3e-2", "--report_to", "none", "--save_strategy", "no", "--preview_data", "0",
    "--data_cache_dir", {str(tmp_path / "cache")!r}]))
ids = torch.tensor([[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]], device="cuda")
trained = trainer.model.eval()
with torch.no_grad():
    a = trained(input_ids=ids).logits.float()
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
base = AutoModelForCausalLM.from_pretrained({str(model_dirs("qwen2"))!r}, quantization_config=quant,
                                            dtype=torch.bfloat16, device_map={{"": 0}})
reloaded = PeftModel.from_pretrained(base, {str(tmp_path / "out")!r}).eval()
with torch.no_grad():
    b = reloaded(input_ids=ids).logits.float()
print("RESULT", json.dumps({{"error": ((a - b).norm() / a.norm()).item()}}))
''')
    proc = sp.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["error"] < 1e-3


def test_cuda_qlora_on_a_gptq_base(model_dirs, tmp_path):
    """run_gptq.py on the GPU, then LoRA on that base: the kernel chosen has a backward, the adapter trains."""
    from safetensors.torch import load_file

    base = tmp_path / "gptq"
    proc = subprocess.run([sys.executable, str(ROOT / "run_gptq.py"), "--model_name_or_path", str(model_dirs("qwen2")),
                           "--data_path", str(DATA), "--out_path", str(base), "--bits", "4", "--group_size", "32",
                           "--num_samples", "8", "--eval_samples", "3", "--max_len", "256", "--data_cache_dir",
                           str(tmp_path / "cache")], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "qlora"
    cli(base, out, "--use_lora", "--q_lora", "--bf16", "True", "--max_steps", 3, "--learning_rate", 3e-2)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 7 * 2 and all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert len(set(losses(out))) > 1


def test_cuda_lora_dpo_packed_with_flex_trains_as_padded(model_dirs, tmp_path):
    """--stage dpo on CUDA (fp32, so the two paths compare closely): the default packed path (flex_attention, the
    chunked log-probs) logs the losses and rewards of a padded sdpa run, step by step."""
    pairs = ROOT / "examples" / "pairs.jsonl"
    logs = {}
    for name, flags in {"packed": ["--packing", "true", "--attn_implementation", "flex_attention"],
                        "padded": ["--packing", "false", "--attn_implementation", "sdpa"]}.items():
        out = tmp_path / name
        proc = cli(model_dirs("qwen2"), out, "--stage", "dpo", "--data_path", pairs, "--template", "qwen",
                   "--use_lora", "--lora_r", 8, "--max_steps", 4, "--learning_rate", 1e-2,
                   "--per_device_train_batch_size", 2, "--model_max_length", 512, *flags)
        assert "objective  DPO (sigmoid)" in proc.stderr
        logs[name] = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
                      if "rewards/margins" in h]
    assert len(logs["packed"]) == len(logs["padded"]) == 4
    for packed, padded in zip(logs["packed"], logs["padded"], strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert packed[key] == pytest.approx(padded[key], rel=1e-3, abs=1e-4), key
