"""--stage dpo under DeepSpeed ZeRO-3 with two CPU processes (gloo): a plain adapter is saved, and a run stopped by a
real SIGTERM to its processes (under the real torchrun) resumes to the same adapter as a run that was never stopped
(ranks forked as torchrun starts them, tests/forkrun.py)."""

import json
import math
import subprocess
import threading
import time
from pathlib import Path

import forkrun
import pytest
import torch
from fixtures import free_port
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "examples" / "pairs.jsonl"
STEPS = 6


def args(model_dir: Path, out: Path, cache: Path) -> list[str]:
    return ["finetune.py", "--model_name_or_path", str(model_dir), "--data_path", str(PAIRS), "--output_dir",
            str(out), "--stage", "dpo", "--use_lora", "--lora_r", "8", "--template", "qwen",
            "--deepspeed", "ds_configs/zero3.json", "--use_cpu", "True", "--max_steps", str(STEPS),
            "--save_strategy", "steps", "--save_steps", "2", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--report_to", "none", "--preview_data", "0",
            "--data_cache_dir", str(cache), "--seed", "0"]


def finish(model_dir: Path, out: Path, cache: Path) -> str:
    proc = forkrun.torchrun(args(model_dir, out, cache))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def workers_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_zero3_lora_dpo_saves_a_plain_adapter_and_resumes_identically_after_sigterm(model_dirs, tmp_path):
    model_dir = model_dirs("qwen2")
    cache = tmp_path / "cache"
    whole = tmp_path / "whole"
    finish(model_dir, whole, cache)
    adapter = load_file(str(whole / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 7 * 2 and all(8 in t.shape for t in adapter.values())  # whole tensors, not shards
    assert all(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)
    report = json.loads((whole / "run_report.json").read_text())
    assert report["plan"]["processes"] == 2 and report["preference"]["train"]["rewards/margins"] > 0
    logs = [h for h in json.loads((whole / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    # the adapter starts at zero: policy == reference, every pair ln 2; the mean over the global batch (both
    # ranks' pairs: each rank's share is rescaled by the process count) is exactly that
    assert abs(logs[0]["loss"] - math.log(2)) < 1e-6

    stopped = tmp_path / "stopped"
    torchrun = forkrun.torchrun_command(free_port())  # the real one: the job gets SIGTERM
    proc = subprocess.Popen(torchrun + args(model_dir, stopped, cache), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while time.time() < deadline and not (stopped / "checkpoint-2").is_dir() and proc.poll() is None:
        time.sleep(0.05)
    assert (stopped / "checkpoint-2").is_dir(), "".join(lines)[-3000:]
    for pid in workers_of(proc.pid):  # as a scheduler does: every process of the job gets SIGTERM
        subprocess.run(["kill", "-TERM", str(pid)])
    proc.wait(timeout=300)
    reader.join(timeout=10)
    err = "".join(lines)
    assert "stopped by signal SIGTERM: checkpoint saved" in err, err[-3000:]
    assert not (stopped / "adapter_model.safetensors").exists()  # stopped before the end
    assert "exitcode  : 143" in err  # rank 0 stopped on its own, with the preemption exit code
    # the one traceback is torchrun's report that its processes stopped, not a failure of ours
    assert err.count("Traceback") == 1 and "ChildFailedError" in err
    resumed = finish(model_dir, stopped, cache)
    assert "resuming from" in resumed
    again = load_file(str(stopped / "adapter_model.safetensors"))
    assert set(again) == set(adapter)
    for name, tensor in adapter.items():
        torch.testing.assert_close(again[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_zero3_full_dpo_keeps_a_partitioned_reference_of_the_base(model_dirs, tmp_path):
    """Full fine-tuning under ZeRO-3: the reference is the base loaded again, partitioned like the policy and run by
    an inference-only engine. At the first step policy == reference, so the loss is exactly ln 2; then the policy
    learns against it and the result is saved whole."""
    model_dir = model_dirs("qwen2")
    out = tmp_path / "full"
    cmd = args(model_dir, out, tmp_path / "cache")
    at = cmd.index("--use_lora")
    del cmd[at:at + 3]  # --use_lora --lora_r 8: full fine-tuning
    cmd[cmd.index("--learning_rate") + 1] = "1e-3"
    cmd[cmd.index("--max_steps") + 1] = "4"
    proc = forkrun.torchrun(cmd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "run_report.json").read_text())
    assert report["plan"]["reference"].startswith("a frozen copy of the base model, partitioned like the policy")
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "rewards/margins" in h]
    assert abs(logs[0]["loss"] - math.log(2)) < 1e-6 and abs(logs[0]["rewards/margins"]) < 1e-6
    assert logs[-1]["rewards/margins"] > 0
    base = load_file(str(model_dir / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    assert all(saved[name].shape == tensor.shape for name, tensor in base.items())  # whole, not shards
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
