"""--stage dpo end to end on CPU: the CLI path with the shipped example pairs, LoRA (reference = adapter disabled), full
fine-tuning (a frozen reference copy), the reference-free losses, the report, the held-out pairs, refusals."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from chattune.errors import UserError
from chattune.train.args import parse_args
from chattune.train.run import run

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "examples" / "pairs.jsonl"


def train(model_dir, out, *extra, data=PAIRS):
    argv = [
        "--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(out), "--stage", "dpo",
        "--per_device_train_batch_size", "2", "--logging_steps", "1", "--use_cpu", "True", "--report_to", "none",
        "--preview_data", "0", "--data_cache_dir", str(out.parent / "cache"), "--save_strategy", "no",
        "--seed", "0", "--template", "qwen", *map(str, extra),
    ]
    return run(*parse_args(argv))


def history(out):
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_lora_dpo_starts_at_ln_2_learns_the_preference_and_reports_it(model_dirs, tmp_path):
    model_dir = model_dirs("qwen2")
    out = tmp_path / "lora"
    trainer = train(model_dir, out, "--use_lora", "--lora_r", 8, "--max_steps", 8, "--learning_rate", 2e-2,
                    "--val_size", 6, "--gradient_accumulation_steps", 2)
    logs = [h for h in history(out) if "loss" in h and "rewards/margins" in h]
    # at the first step the adapter is zero: policy == reference, every pair's loss is ln 2
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert logs[-1]["loss"] < 0.5 and logs[-1]["rewards/margins"] > 0.5
    report = json.loads((out / "run_report.json").read_text())
    assert report["plan"]["objective"] == "DPO (sigmoid), beta 0.1"
    assert report["plan"]["reference"].startswith("the base model with the adapter disabled")
    assert report["plan"]["global_batch_samples"] == 4  # pairs: 2 per device x 2 accumulation
    held = report["preference"]["eval"]
    assert held["pairs"] == 6 and 0 <= held["rewards/accuracies"] <= 1
    assert held["rewards/margins"] == pytest.approx(held["rewards/chosen"] - held["rewards/rejected"], abs=1e-6)
    assert report["data"]["pairs"] == 20 and report["data"]["kept"] == 40
    assert (out / "loss.png").stat().st_size > 0
    # the held-out pairs are written as canonical pair records, which read back as pairs
    records = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(set(r) >= {"prompt", "chosen", "rejected"} for r in records)
    # a plain adapter that loads into the base with peft alone and computes what the trained model computes
    from peft import PeftModel

    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    ids = torch.tensor([[9707, 11, 1879, 0]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


@pytest.mark.slow
def test_full_dpo_keeps_a_frozen_reference_of_the_base(model_dirs, tmp_path):
    model_dir = model_dirs("qwen2")
    out = tmp_path / "full"
    trainer = train(model_dir, out, "--max_steps", 4, "--learning_rate", 1e-3)
    logs = [h for h in history(out) if "rewards/margins" in h]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == the reference copy at the start
    base = load_file(str(model_dir / "model.safetensors"))
    reference = trainer.ref_model.state_dict()
    assert all(torch.equal(reference[name], tensor) for name, tensor in base.items())  # never trained
    saved = load_file(str(out / "model.safetensors"))
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    plan = json.loads((out / "run_report.json").read_text())["plan"]
    assert plan["reference"].startswith("a frozen copy of the base model")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["simpo", "orpo", "ipo"])
def test_the_other_losses_train_and_the_reference_free_ones_load_no_reference(loss, model_dirs, tmp_path):
    out = tmp_path / loss
    trainer = train(model_dirs("qwen2"), out, "--pref_loss", loss, "--max_steps", 6, "--learning_rate", 1e-3)
    logs = [h for h in history(out) if "rewards/margins" in h]
    assert len(logs) == 6 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    plan = json.loads((out / "run_report.json").read_text())["plan"]
    assert (plan["reference"].startswith("none")) == (loss != "ipo")
    assert (trainer.ref_model is None) == (loss != "ipo")


def test_the_stage_and_the_data_must_agree(model_dirs, tmp_path):
    model_dir = model_dirs("qwen2")
    with pytest.raises(UserError, match=r"is a supervised conversation, not a preference pair.*--stage sft"):
        train(model_dir, tmp_path / "a", "--use_lora", "--max_steps", 1, data=ROOT / "examples" / "sharegpt.json")
    argv = ["--model_name_or_path", str(model_dir), "--data_path", str(PAIRS), "--output_dir", str(tmp_path / "b"),
            "--use_cpu", "True", "--data_cache_dir", str(tmp_path / "cache"), "--template", "qwen"]
    with pytest.raises(UserError, match=r"a preference pair .*pass --stage dpo"):
        run(*parse_args(argv))


@pytest.mark.parametrize("flags, problem", [
    (["--pref_beta", "0.2"], "--pref_beta applies to preference training only: add --stage dpo"),
    (["--stage", "dpo", "--pref_loss", "sigmoid", "--simpo_gamma", "2"],
     "--simpo_gamma applies to --pref_loss simpo only (this run uses sigmoid)"),
    (["--stage", "dpo", "--pref_loss", "orpo", "--pref_beta", "0.1"], "ORPO has no beta; its odds-ratio weight is"),
    (["--stage", "dpo", "--pref_beta", "0"], "--pref_beta 0.0: beta must be above 0"),
    (["--stage", "dpo", "--train_on", "last"], "a preference pair compares its final answers only"),
    (["--stage", "dpo", "--fused_ce", "liger"], "preference losses need every sequence's log-prob"),
    (["--stage", "dpo", "--use_lora", "--lora_weight_path", "."],
     "the reference would be the base without that adapter, not the model preference training starts from"),
    (["--stage", "dpo", "--packing", "true", "--model_max_length", "512", "--max_tokens_per_batch", "800"],
     "below twice --model_max_length 512: the longest preference pairs"),
])
def test_preference_flags_are_checked_before_anything_loads(flags, problem, model_dirs, tmp_path):
    from chattune.errors import ConfigError

    argv = ["--model_name_or_path", str(model_dirs("qwen2")), "--data_path", str(PAIRS), "--output_dir",
            str(tmp_path), "--use_cpu", "True", *flags]
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        run(*parse_args(argv))


@pytest.mark.slow
def test_packed_and_padded_runs_train_the_same_and_eval_ignores_its_batch_size(model_dirs, tmp_path):
    model_dir = model_dirs("qwen2")
    runs = {}
    for name, flags in {"padded": ["--packing", "false", "--per_device_eval_batch_size", "1"],
                        "packed": ["--packing", "true", "--max_tokens_per_batch", "1024"],
                        "padded-eval-4": ["--packing", "false", "--per_device_eval_batch_size", "4"]}.items():
        out = tmp_path / name
        train(model_dir, out, "--use_lora", "--lora_r", 8, "--max_steps", 4, "--learning_rate", 2e-2, "--val_size",
              6, "--model_max_length", 512, *flags)
        runs[name] = (history(out), json.loads((out / "run_report.json").read_text()))
    assert runs["packed"][1]["plan"]["batches"].startswith("packed")
    for name in ("packed", "padded-eval-4"):
        for mine, theirs in zip(runs[name][0], runs["padded"][0], strict=True):
            for key in ("loss", "rewards/margins", "rewards/accuracies", "eval_loss", "eval_rewards/margins"):
                if key in theirs:
                    assert mine[key] == pytest.approx(theirs[key], abs=2e-5), (name, key)


@pytest.mark.slow
def test_qwen35_dpo_packed_equals_padded_on_its_own_template(model_dirs, tmp_path):
    """Today's Qwen (a vision-language checkpoint, Gated DeltaNet layers, its XML tool-call template): LoRA DPO runs
    on the checkpoint's text path, and packed rows (linear attention restarted at every sequence) train as padded."""
    runs = {}
    for packing in ("true", "false"):
        out = tmp_path / packing
        argv = ["--model_name_or_path", str(model_dirs("qwen3_5")), "--data_path", str(PAIRS), "--output_dir",
                str(out), "--stage", "dpo", "--use_lora", "--lora_r", "8", "--max_steps", "4",
                "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--use_cpu", "True", "--report_to",
                "none", "--logging_steps", "1", "--save_strategy", "no", "--preview_data", "0", "--data_cache_dir",
                str(tmp_path / "cache"), "--packing", packing, "--model_max_length", "1024"]
        run(*parse_args(argv))
        runs[packing] = [h["loss"] for h in history(out) if "rewards/margins" in h]
    assert runs["true"][0] == pytest.approx(math.log(2), abs=1e-6) and runs["true"][-1] < runs["true"][0]
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-5)
