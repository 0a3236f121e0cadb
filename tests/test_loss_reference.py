"""The trainer's loss and gradient equal an independent reference, end to end.

The reference is computed here, outside the trainer: every sample of the global batch run on its own (no padding,
no packing), cross-entropy of logits[t] against labels[t + 1] over the trained tokens, summed over all samples and
divided once by the number of trained tokens. One optimizer step of plain SGD (lr 1, no clipping, no weight decay)
then moves every weight by exactly minus that loss's gradient. The trainer must log the same loss and write the same
update: padded or packed, fused (chunked) or the model's own logits, with gradient accumulation, on two ranks, and for
a model class that tells transformers it accepts no loss kwargs.
"""

import json
import signal
from pathlib import Path

import forkrun
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from chattune.train.args import parse_args
from chattune.train.batches import pack_bins
from chattune.train.run import run

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 8  # the global batch of the one step: every sample of the data
SGD = ["--optim", "sgd", "--learning_rate", "1.0", "--max_grad_norm", "0", "--weight_decay", "0",
       "--lr_scheduler_type", "constant", "--max_steps", "1", "--save_strategy", "no", "--logging_steps", "1",
       "--report_to", "none", "--preview_data", "0", "--use_cpu", "True", "--seed", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    records = json.loads((ROOT / "examples" / "sharegpt.json").read_text())[:SAMPLES]
    path = tmp_path_factory.mktemp("data") / "eight.json"
    path.write_text(json.dumps(records))
    return path


def tokenized(model_dir, data, tmp_path, max_length=512):
    """The samples as the pipeline tokenizes them (what the trainer trains on)."""
    dump = tmp_path / "tokens.jsonl"
    run(*parse_args(["--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir",
                     str(tmp_path / "dump"), "--dump_tokenized", str(dump), "--preview_data", "0", "--use_cpu", "True",
                     "--data_cache_dir", str(tmp_path / "cache"), "--model_max_length", str(max_length)]))
    return [json.loads(line) for line in dump.read_text().splitlines()]


def step_args(model_dir, data, tmp_path, out, *extra) -> list[str]:
    """finetune.py arguments of the one SGD step on `data`, written to `out`."""
    return ["--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(out),
            "--data_cache_dir", str(tmp_path / "cache"), *SGD, *map(str, extra)]


def reference(model_dir, samples):
    """(mean CE over the trained tokens of all samples, its gradient per parameter), each sample on its own."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total, count = 0.0, 0
    for s in samples:
        logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, :-1].float()
        target = torch.tensor(s["labels"][1:])
        keep = target != -100
        total = total + F.cross_entropy(logits[keep], target[keep], reduction="sum")
        count += int(keep.sum())
    loss = total / count
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_step(model_dir, out, ref_loss, ref_grads):
    logged = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert logged[0] == pytest.approx(ref_loss, rel=1e-5)
    before, after = load_file(str(model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name, grad in ref_grads.items():
        update = before[name] - after[name]  # SGD, lr 1: the step is minus the gradient
        torch.testing.assert_close(update, grad, rtol=2e-3, atol=2e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["chunked", "none"])
@pytest.mark.parametrize("batches", ["padded", "packed"])
def test_one_step_equals_reference_with_accumulation(model_dirs, data, tmp_path, batches, loss):
    model_dir = model_dirs("qwen2")
    samples = tokenized(model_dir, data, tmp_path)
    ref_loss, ref_grads = reference(model_dir, samples)
    if batches == "packed":  # micro-batches of at most 256 tokens: several per step, accumulated
        bins = len(pack_bins([len(s["input_ids"]) for s in samples], 256))
        assert bins >= 2
        extra = ["--packing", "true", "--max_tokens_per_batch", "256", "--model_max_length", "256",
                 "--gradient_accumulation_steps", bins]
    else:
        extra = ["--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2]
    out = tmp_path / "out"
    run(*parse_args(step_args(model_dir, data, tmp_path, out, "--fused_ce", loss, *extra)))
    check_step(model_dir, out, ref_loss, ref_grads)


@pytest.mark.slow
def test_model_that_accepts_no_loss_kwargs_is_normalized_the_same(model_dirs, data, tmp_path, monkeypatch):
    """transformers skips `num_items_in_batch` for such classes (Gemma-3 checkpoints load as one); we count anyway."""
    import transformers

    monkeypatch.setattr(transformers.Qwen2ForCausalLM, "accepts_loss_kwargs", False, raising=False)
    model_dir = model_dirs("qwen2")
    samples = tokenized(model_dir, data, tmp_path)
    ref_loss, ref_grads = reference(model_dir, samples)
    out = tmp_path / "out"
    run(*parse_args(step_args(model_dir, data, tmp_path, out, "--fused_ce", "none", "--per_device_train_batch_size",
                              1, "--gradient_accumulation_steps", 8)))
    check_step(model_dir, out, ref_loss, ref_grads)


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "ds_configs/zero2.json"])
def test_two_ranks_with_accumulation_equal_reference(model_dirs, data, tmp_path, deepspeed):
    """2 processes x 2 samples x 2 accumulation steps: the global batch is all 8 samples."""
    model_dir = model_dirs("qwen2")
    samples = tokenized(model_dir, data, tmp_path)
    ref_loss, ref_grads = reference(model_dir, samples)
    out = tmp_path / "out"
    # evaluated once after the step: 3 eval batches of 3 on 2 ranks, so one rank runs an uncounted extra one
    args = ["finetune.py", *step_args(model_dir, data, tmp_path, out, "--per_device_train_batch_size", 2,
                                      "--gradient_accumulation_steps", 2, "--eval_data_path", data,
                                      "--per_device_eval_batch_size", 3)]
    if deepspeed:
        args += ["--deepspeed", deepspeed]
    proc = forkrun.torchrun(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_step(model_dir, out, ref_loss, ref_grads)
    eval_loss = json.loads((out / "run_report.json").read_text())["eval_loss"]
    assert eval_loss == pytest.approx(reference(out, samples)[0], rel=1e-5)  # the trained model on all 8 samples


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_fused_loss_applies_the_family_logit_transform(model_dirs, data, tmp_path, family):
    """Soft-capping (Gemma-2), logit_scale (Cohere), logits_scaling (Granite): the default fused loss trains the
    model's own objective, the one its logits define."""
    model_dir = model_dirs(family)
    samples = tokenized(model_dir, data, tmp_path)
    ref_loss, ref_grads = reference(model_dir, samples)
    out = tmp_path / "out"
    run(*parse_args(step_args(model_dir, data, tmp_path, out, "--fused_ce", "auto", "--per_device_train_batch_size",
                              4, "--gradient_accumulation_steps", 2)))
    report = json.loads((out / "run_report.json").read_text())
    assert report["plan"]["loss"] == "fused linear+CE (chunked)" and report["plan"]["logit_transform"] != "none"
    assert report["loss_path"] == "chunked"  # the first-batch check passed: no fallback to the model's logits
    check_step(model_dir, out, ref_loss, ref_grads)


@pytest.mark.slow
def test_unknown_logit_transform_is_caught_on_the_first_micro_batch(model_dirs, data, tmp_path, monkeypatch,
                                                                    capsys):
    """A family whose transform chattune does not know (simulated: the Gemma-2 soft-cap forgotten): an explicit
    fused loss stops with a clear error; auto falls back to the model's own logits and still trains the right loss."""
    import chattune.train.run
    from chattune.errors import ConfigError
    from chattune.train.loss import LogitTransform

    monkeypatch.setattr(chattune.train.run, "logit_transform", lambda config: LogitTransform())
    model_dir = model_dirs("gemma2")
    argv = ["--model_name_or_path", str(model_dir), "--data_path", str(data), "--data_cache_dir",
            str(tmp_path / "cache"), *SGD, "--per_device_train_batch_size", "8"]
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ConfigError, match="model's own loss is .*Use --fused_ce none"):
        run(*parse_args([*argv, "--output_dir", str(tmp_path / "explicit"), "--fused_ce", "chunked"]))
    assert signal.getsignal(signal.SIGTERM) is before  # the preemption handler does not outlive a failed run
    out = tmp_path / "auto"
    run(*parse_args([*argv, "--output_dir", str(out), "--fused_ce", "auto"]))
    assert "using the model's own logits instead (--fused_ce none)" in capsys.readouterr().err
    ref_loss, ref_grads = reference(model_dir, tokenized(model_dir, data, tmp_path))
    check_step(model_dir, out, ref_loss, ref_grads)


def steps_of(trainer, epoch=0) -> list[list[int]]:
    """The samples of every optimizer step as the trainer cut them (every rank's micro-batches of the step)."""
    return [sorted(i for slots in ranks for batch in slots for i in batch)
            for ranks in trainer.steps.step_layout(epoch)]


@pytest.mark.slow
def test_packed_and_padded_runs_take_the_same_steps_with_the_same_samples(model_dirs, tmp_path):
    """The recipe is the user's: 2 samples per micro-batch x 2 accumulated = 4 per optimizer step, packed or padded,
    whatever the token budget cuts them into. Same steps, same samples in each, the same loss and update."""
    model_dir = model_dirs("qwen2")
    data = ROOT / "examples" / "sharegpt.json"  # 13 conversations: steps of 4, 4, 4, 1
    runs = {}
    for name, extra in (("padded", ["--packing", "false"]),
                        ("packed", ["--packing", "true", "--max_tokens_per_batch", "128"]),
                        ("one row", ["--packing", "true", "--max_tokens_per_batch", "4096"])):
        out = tmp_path / name.replace(" ", "_")
        args = step_args(model_dir, data, tmp_path, out, "--per_device_train_batch_size", 2,
                         "--gradient_accumulation_steps", 2, "--model_max_length", 128, "--fused_ce", "none", *extra)
        args[args.index("--max_steps") + 1] = "4"
        args[args.index("--learning_rate") + 1] = "0.05"
        runs[name] = (run(*parse_args(args)), out)
    layouts = {name: steps_of(trainer) for name, (trainer, _) in runs.items()}
    assert [len(s) for s in layouts["padded"]] == [4, 4, 4, 1]
    assert layouts["packed"] == layouts["padded"] == layouts["one row"]
    assert runs["packed"][0].args.gradient_accumulation_steps > runs["one row"][0].args.gradient_accumulation_steps
    logged = {name: [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
                     if "loss" in h] for name, (_, out) in runs.items()}
    assert len(logged["padded"]) == 4
    for name in ("packed", "one row"):
        assert logged[name] == pytest.approx(logged["padded"], rel=1e-5)
        padded, other = load_file(str(runs["padded"][1] / "model.safetensors")), load_file(
            str(runs[name][1] / "model.safetensors"))
        for key, tensor in padded.items():
            torch.testing.assert_close(other[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
