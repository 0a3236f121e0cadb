"""Training end to end on CPU: full, LoRA and Q-LoRA; what changed, what did not, reload, resume, preemption."""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from chattune.train.args import parse_args
from chattune.train.run import run

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "sharegpt.json"


def train(model_dir, out, *extra):
    argv = [
        "--model_name_or_path", str(model_dir), "--data_path", str(DATA), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--use_cpu", "True", "--report_to", "none",
        "--preview_data", "0", "--data_cache_dir", str(out.parent / "cache"), "--save_strategy", "no",
        "--seed", "0", *map(str, extra),
    ]
    return run(*parse_args(argv))


def losses(out):
    return [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


@torch.no_grad()
def logits(model, tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 times 12?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    return model(input_ids=ids).logits.float()


def base_state(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_full_finetune_learns_changes_all_and_reloads(model_dirs, tmp_path):
    model_dir = model_dirs("qwen2")
    out = tmp_path / "full"
    trainer = train(model_dir, out, "--max_steps", 12, "--learning_rate", 3e-3)
    loss = losses(out)
    assert all(torch.isfinite(torch.tensor(loss))) and loss[-1] < loss[0] - 1.0
    saved = load_file(str(out / "model.safetensors"))
    before = base_state(model_dir)
    assert set(saved) == set(before)
    changed = [k for k in before if not torch.equal(before[k], saved[k])]
    assert set(changed) == set(before)  # every weight trains in full fine-tuning
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    trainer.model.eval()
    torch.testing.assert_close(logits(reloaded, tok), logits(trainer.model, tok))
    # the output is a complete, self-describing model directory
    report = json.loads((out / "run_report.json").read_text())
    assert report["steps"] == 12 and report["final_loss"] == loss[-1] and report["plan"]["mode"] == "full"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
    assert tok.chat_template == AutoTokenizer.from_pretrained(model_dir).chat_template


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_lora_and_qlora_train_only_the_adapter_and_reload(model_dirs, tmp_path, mode):
    from peft import PeftModel

    model_dir = model_dirs("qwen2")
    out = tmp_path / mode
    extra = ["--use_lora", "--lora_r", 8, "--lora_alpha", 16, "--max_steps", 12, "--learning_rate", 3e-2]
    if mode == "qlora":
        extra += ["--q_lora", "--bf16", "True"]
    trainer = train(model_dir, out, *extra)
    loss = losses(out)
    assert loss[-1] < loss[0] - 1.5
    adapter = load_file(str(out / "adapter_model.safetensors"))
    # every linear layer of the decoder is adapted: 7 per layer x 2 layers, A and B each
    assert len(adapter) == 2 * 7 * 2 and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    model = trainer.model
    if mode == "qlora":
        import bitsandbytes as bnb

        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14
    # frozen base weights did not move
    before = base_state(model_dir)
    base = model.get_base_model().state_dict()
    embed = base["model.embed_tokens.weight"]
    assert torch.equal(embed, before["model.embed_tokens.weight"].to(embed.dtype))
    if mode == "lora":
        assert torch.equal(base["model.layers.0.self_attn.q_proj.base_layer.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == str(model_dir)
    if mode == "lora":
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
        tok = AutoTokenizer.from_pretrained(out)
        model.eval()
        torch.testing.assert_close(logits(reloaded, tok), logits(model, tok))


@pytest.mark.slow
def test_lora_on_moe_adapts_experts_too(model_dirs, tmp_path):
    from peft import PeftModel

    out = tmp_path / "moe"
    trainer = train(model_dirs("deepseek_v2"), out, "--use_lora", "--lora_r", 4, "--max_steps", 2)
    adapted = {n.split(".lora_A")[0].split("layers.")[-1] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    attention = {f"{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
    experts = {"1.mlp.experts", "1.mlp.experts.base_layer"}  # gate_up_proj and down_proj of the fused experts
    mlps = {f"0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}  # the dense first layer (peft#3711)
    shared = {f"1.mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert adapted == attention | experts | mlps | shared | {"1.mlp.gate"}  # the router too, as peft converts it
    # the saved adapter reloads into exactly the trained model
    trainer.model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs("deepseek_v2")), out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded, tok), logits(trainer.model, tok))


@pytest.mark.slow
def test_template_with_new_tokens_trains_embeddings(model_dirs, tmp_path):
    """A DeepSeek-vocabulary base trained on ChatML: <|im_start|>/<|im_end|> are new, embeddings must train."""
    out = tmp_path / "newtok"
    trainer = train(model_dirs("deepseek"), out, "--use_lora", "--lora_r", 4, "--max_steps", 2, "--template", "chatml")
    report = json.loads((out / "run_report.json").read_text())
    assert report["plan"]["modules_to_save"].startswith("auto: the template added tokens <|im_start|>, <|im_end|>")
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trained) and any("lm_head" in n for n in trained)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|im_end|>") is not None and "<|im_start|>" in tok.chat_template


@pytest.mark.slow
@pytest.mark.parametrize("batches", ["padded", "packed"])
def test_rerun_resumes_from_last_checkpoint(model_dirs, tmp_path, batches):
    """Stopped mid-epoch (padded: 4 steps per epoch; packed: 3 micro-batches of <= 256 tokens per epoch), the same
    command resumes at the next step and continues exactly as an uninterrupted run (data order, optimizer state and
    dropout RNG)."""
    model_dir = model_dirs("qwen2")
    out = tmp_path / "resume"
    stop = 3 if batches == "padded" else 2
    common = ["--use_lora", "--lora_r", 8, "--learning_rate", 1e-2, "--save_strategy", "steps", "--save_steps", stop,
              "--lr_scheduler_type", "constant"]  # the schedule must not depend on max_steps for the comparison
    if batches == "packed":
        common += ["--packing", "true", "--max_tokens_per_batch", 256, "--model_max_length", 256]
    train(model_dir, out, *common, "--max_steps", stop)  # an "interrupted" run: stops after its checkpoint
    assert (out / f"checkpoint-{stop}").is_dir()
    first = losses(out)
    train(model_dir, out, *common, "--max_steps", 6)  # the same command, longer: continues at the next step
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6] and state["global_step"] == 6
    assert losses(out)[:stop] == first
    # throughput counts this process's own tokens and time, not the tokens of the run it resumed
    report = json.loads((out / "run_report.json").read_text())
    assert 0 < report["tokens_this_process"] < report["tokens_seen"]
    assert report["tokens_per_second"] == pytest.approx(report["tokens_this_process"] / report["wall_seconds"],
                                                        rel=0.02)
    # uninterrupted reference: the same six steps in one go give the same losses
    ref = tmp_path / "ref"
    train(model_dir, ref, *common, "--max_steps", 6)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(ref)), rtol=1e-4, atol=1e-4)
    assert json.loads((ref / "run_report.json").read_text())["tokens_seen"] == report["tokens_seen"]


@pytest.mark.slow
@pytest.mark.parametrize("signals, code", [((signal.SIGTERM,), 143), ((signal.SIGINT,), 130)])
def test_sigterm_saves_checkpoint_and_exits_cleanly(model_dirs, tmp_path, signals, code):
    """A real signal to a real training process: SIGTERM (preemption) and Ctrl-C save a checkpoint at the end of the
    step and exit 143 / 130. Never a traceback."""
    out = tmp_path / "preempt"
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--model_name_or_path", str(model_dirs("qwen2")),
           "--data_path", str(DATA), "--output_dir", str(out), "--use_lora", "--max_steps", "100000",
           "--per_device_train_batch_size", "1", "--use_cpu", "True", "--report_to", "none", "--logging_steps", "1",
           "--save_strategy", "no", "--data_cache_dir", str(tmp_path / "cache"), "--preview_data", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 180
    while time.time() < deadline and not any(line.startswith("plan:") for line in lines) and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(3)  # a few training steps
    for sig in signals:
        proc.send_signal(sig)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter_model.safetensors").exists()
    assert "run the same command again to resume" in err


def _start(cmd, env=None):
    """A process whose stderr lines are collected as they come."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    return proc, lines, reader


def _wait_for(proc, lines, text, seconds=180):
    deadline = time.time() + seconds
    while time.time() < deadline and not any(text in line for line in lines) and proc.poll() is None:
        time.sleep(0.05)
    assert any(text in line for line in lines), "".join(lines)[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, says", [(signal.SIGTERM, 143, "stopped by SIGTERM before training started"),
                                             (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_a_signal_during_data_preparation_ends_cleanly_and_leaves_no_temporary_files(model_dirs, tmp_path, sig, code,
                                                                                     says):
    """A real signal while 20,000 conversations are being tokenized: the exit code of the signal, one line, no
    traceback, and no half-written cache entry or temporary folder left (SIGTERM's default action left both)."""
    data = tmp_path / "big.jsonl"
    with open(data, "w") as f:
        for i in range(20_000):
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"q{i} " + "why " * 10},
                                                  {"from": "gpt", "value": f"a{i} " + "so " * 30}]}) + "\n")
    cache = tmp_path / "cache"
    proc, lines, reader = _start([
        sys.executable, str(ROOT / "finetune.py"), "--model_name_or_path", str(model_dirs("qwen2")), "--data_path",
        str(data), "--output_dir", str(tmp_path / "out"), "--use_lora", "--max_steps", "1", "--use_cpu", "True",
        "--report_to", "none", "--data_cache_dir", str(cache), "--preview_data", "0",
        "--preprocessing_num_workers", "2"])
    try:
        _wait_for(proc, lines, "Preparing training data")
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        proc.kill()  # not left behind when the test fails
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == code and says in err and "Traceback" not in err, err[-3000:]
    left = [p.name for p in cache.rglob("*") if p.name.endswith(".tmp") or p.name == "dataset.arrow"]
    assert not left, left


_STALL_BEFORE_THE_FINAL_SAVE = """
import sys, time
sys.path.insert(0, sys.argv[1])
import chattune.train.save as save
original = save.write_result
def slow(*args, **kwargs):
    print("SAVING", file=sys.stderr, flush=True)
    time.sleep(3)
    return original(*args, **kwargs)
save.write_result = slow
sys.argv = ["finetune.py", *sys.argv[2:]]
import finetune
sys.exit(finetune.main())
"""


@pytest.mark.slow
def test_a_signal_during_the_final_save_saves_the_result_and_exits_0(model_dirs, tmp_path):
    """SIGTERM after the last step, while the result is being written (the write held for 3 s so the signal lands
    there): the finished result is saved whole and the run ends as finished (exit 0), which slurm.sbatch does not
    requeue. The default action killed the process mid-save with 143."""
    out = tmp_path / "out"
    proc, lines, reader = _start([
        sys.executable, "-c", _STALL_BEFORE_THE_FINAL_SAVE, str(ROOT), "--model_name_or_path",
        str(model_dirs("qwen2")), "--data_path", str(DATA), "--output_dir", str(out), "--use_lora", "--max_steps",
        "2", "--use_cpu", "True", "--report_to", "none", "--save_strategy", "no", "--preview_data", "0",
        "--data_cache_dir", str(tmp_path / "cache")])
    try:
        _wait_for(proc, lines, "SAVING")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "SIGTERM arrived after the last step: the finished result is saved" in err
    assert (out / "adapter_model.safetensors").is_file() and (out / "run_report.json").is_file()


def test_packed_run_with_fused_loss_trains_and_reports(model_dirs, tmp_path):
    out = tmp_path / "packed"
    train(model_dirs("qwen2"), out, "--use_lora", "--lora_r", 8, "--learning_rate", 3e-2, "--max_steps", 10,
          "--packing", "true", "--max_tokens_per_batch", 256, "--model_max_length", 256, "--fused_ce", "chunked")
    loss = losses(out)
    assert len(loss) == 10 and loss[-1] < loss[0] - 1.5
    report = json.loads((out / "run_report.json").read_text())
    assert report["plan"]["batches"] == "packed, 256 tokens per micro-batch"
    assert report["plan"]["loss"] == "fused linear+CE (chunked)"
    # 620 tokens in bins of <= 256: 3 micro-batches per epoch, every token counted once per epoch
    assert report["plan"]["steps"] == 10 and report["tokens_seen"] > 0


@pytest.mark.slow
def test_signal_after_the_last_step_still_saves_the_result(model_dirs, tmp_path, monkeypatch, capsys):
    """A SIGTERM that lands after the last step's preemption check stops nothing: the finished model is saved, the
    run exits normally, and no checkpoint is claimed."""
    import os

    from transformers import TrainerCallback

    import chattune.train.run

    class LateSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # runs after PreemptionCallback's check
            if state.global_step == state.max_steps:
                os.kill(os.getpid(), signal.SIGTERM)

    build = chattune.train.run.build_trainer

    def with_late_signal(*args, **kwargs):
        trainer, clock, preemption = build(*args, **kwargs)
        trainer.add_callback(LateSignal())
        return trainer, clock, preemption

    monkeypatch.setattr(chattune.train.run, "build_trainer", with_late_signal)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "late"
    train(model_dirs("qwen2"), out, "--use_lora", "--lora_r", 4, "--max_steps", 2)
    err = capsys.readouterr().err
    assert (out / "adapter_model.safetensors").exists() and (out / "run_report.json").exists()
    assert "received after the last step: saving the finished result" in err
    assert "checkpoint saved" not in err and not list(out.glob("checkpoint-*"))
    assert signal.getsignal(signal.SIGTERM) is before  # our handler is gone again


@pytest.mark.slow
def test_eval_data_is_evaluated_token_weighted_independent_of_batching(model_dirs, tmp_path):
    """--eval_data_path alone means evaluation happens (here once, after training: no checkpoints). eval_loss is the
    mean over every trained token of the eval set, computed here from the saved model, for any eval batch size,
    padded or packed."""
    import torch.nn.functional as F

    model_dir = model_dirs("qwen2")
    out = tmp_path / "eval"
    trainer = train(model_dir, out, "--eval_data_path", DATA, "--max_steps", 2, "--learning_rate", 1e-3,
                    "--per_device_eval_batch_size", 3)
    report = json.loads((out / "run_report.json").read_text())
    assert report["plan"]["evaluation"] == "once, after training"
    dataset = trainer.eval_dataset
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in dataset:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            target = torch.tensor(row["labels"][1:])
            keep = target != -100
            total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    assert report["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    values = []
    for batch_size, packed_tokens in [(1, 0), (5, 0), (1, 96), (1, 4096)]:
        trainer.args.per_device_eval_batch_size = batch_size
        trainer.eval_tokens_per_batch = packed_tokens
        metrics = trainer.evaluate()
        assert metrics["eval_tokens"] == count
        values.append(metrics["eval_loss"])
    assert values == pytest.approx([total / count] * 4, rel=1e-5)


@pytest.mark.slow
def test_eval_runs_with_every_checkpoint_by_default(model_dirs, tmp_path):
    out = tmp_path / "eval-steps"
    train(model_dirs("qwen2"), out, "--use_lora", "--lora_r", 4, "--eval_data_path", DATA, "--max_steps", 4,
          "--save_strategy", "steps", "--save_steps", 2)
    state = json.loads((out / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [2, 4]
    assert json.loads((out / "run_report.json").read_text())["plan"]["evaluation"].startswith("every 2 steps")


def test_a_loss_that_is_not_a_number_ends_the_run_at_that_step_and_saves_nothing_of_it(model_dirs, tmp_path, capsys):
    """A learning rate of 1e30: step 1 trains, its update overflows the weights, step 2's loss is nan. The run
    logs nan (the stock Trainer logged the window's earlier mean: 0 here, and went on), stops at step 2 without
    saving or evaluating it, and ends with an error naming the step and the last good checkpoint."""
    from chattune.train import checkpoints
    from chattune.train.trainer import Diverged

    out = tmp_path / "diverged"
    with pytest.raises(Diverged, match=r"became nan or inf at step 2.*checkpoint-1 \(step 1\)") as raised:
        train(model_dirs("qwen2"), out, "--learning_rate", 1e30, "--max_steps", 4, "--save_strategy", "steps",
              "--save_steps", 1, "--eval_data_path", DATA, "--eval_steps", 1)
    assert "--learning_rate" in str(raised.value)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert checkpoints.problem(str(out / "checkpoint-1")) is None
    assert not (out / "model.safetensors").exists() and not (out / "run_report.json").exists()
    logged = "".join(capsys.readouterr())
    assert "'loss': 'nan'" in logged and "'eval_loss'" in logged  # step 1 evaluated, step 2 not (one eval only)
    assert logged.count("'eval_loss'") == 1


def test_a_second_ctrl_c_stops_at_once():
    from chattune.train.callbacks import PreemptionCallback

    callback = PreemptionCallback()
    callback._handle(signal.SIGINT, None)  # the first one: a checkpoint at the end of the step
    assert callback.signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):  # the second one: now (main_guard turns it into exit 130, no traceback)
        callback._handle(signal.SIGINT, None)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decoder_layers_train_to_the_same_losses(model_dirs, tmp_path):
    """--compile_layers compiles each decoder layer (regional torch.compile): the same run, the same losses and the
    same trained weights as eager (SGD: an update proportional to the gradient, so equal weights mean equal
    gradients; Adam's normalized step would blow up rounding differences of near-zero gradients)."""
    model_dir = model_dirs("qwen2")
    flags = ("--max_steps", 3, "--learning_rate", 1e-1, "--use_lora", "False", "--optim", "sgd")
    eager = train(model_dir, tmp_path / "eager", *flags)
    compiled = train(model_dir, tmp_path / "compiled", *flags, "--compile_layers", "True")
    layers = compiled.model.model.layers
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)  # really compiled
    assert not any(getattr(layer, "_compiled_call_impl", None) for layer in eager.model.model.layers)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "compiled")), torch.tensor(losses(tmp_path / "eager")),
                               rtol=1e-4, atol=1e-5)
    before = base_state(model_dir)
    for (name, a), (_, b) in zip(compiled.model.named_parameters(), eager.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        assert name not in before or not torch.equal(a, before[name]), f"{name} did not train"
