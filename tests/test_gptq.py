"""run_gptq.py: GPTQ 4/8-bit from a model or an adapter dir, calibrated on the user's conversations, reloaded as is."""

import dataclasses
import json
import math
from pathlib import Path

import forkrun
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chattune.errors import UserError
from chattune.export import gptq
from chattune.export import samples as samples_module
from chattune.export.gptq import quantized_linear_count
from chattune.export.samples import Samples, perplexity, split_conversations

ROOT = Path(__file__).resolve().parents[1]
# one test process (pytest -n 2 --dist loadgroup): `adapter`, a LoRA training run, is built once
pytestmark = pytest.mark.xdist_group("gptq")
DATA = ROOT / "examples" / "sharegpt.json"  # 13 conversations
GROUP_SIZE = 32  # the tiny models are 64 wide: the default 128 does not divide their layers
# Relative L2 error of the logits against the float model, measured on the tiny random qwen2 (gptqmodel 7.6.0, CPU):
# 4-bit 0.357, 8-bit 0.021 (0.018 for the adapter). Its wide random init (initializer_range 0.2) amplifies weight
# error far more than a trained model does. Plain round-to-nearest with the same grid (round_to_nearest below) gives
# 0.43 / 0.031: GPTQ must beat it, or its calibration did nothing.
MAX_LOGIT_ERROR = {4: 0.6, 8: 0.05}
# Perplexity change on the 3 held-out conversations, measured: 4-bit +15.9%, 8-bit +0.75%.
MAX_PERPLEXITY_CHANGE = {4: 0.4, 8: 0.03}
HELD_OUT = [{"role": "user", "content": "Name the largest planet and one of its moons."},
            {"role": "assistant", "content": "Jupiter; Europa is one of its moons."},
            {"role": "user", "content": "And the smallest planet?"}]


def script(name, *args, rc=0):
    return forkrun.script(name, *args, rc=rc)


def quantize(model, out, bits, cache):
    return script("run_gptq.py", "--model_name_or_path", model, "--data_path", DATA, "--out_path", out,
                  "--bits", bits, "--group_size", GROUP_SIZE, "--num_samples", 8, "--eval_samples", 3,
                  "--max_len", 256, "--data_cache_dir", cache)


@torch.no_grad()
def logits(model, tok):
    batch = tok.apply_chat_template(HELD_OUT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return model(**batch).logits.float()


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def test_split_is_disjoint_deterministic_and_reports_a_shortfall():
    split = split_conversations(200, eval_samples=32, num_samples=128, seed=0)
    assert len(split.eval) == 32 and len(split.calibration) == 128 and split.shortfall is None
    assert not set(split.eval) & set(split.calibration)
    assert split == split_conversations(200, 32, 128, seed=0)
    assert split.eval != split_conversations(200, 32, 128, seed=1).eval

    small = split_conversations(13, eval_samples=32, num_samples=128)
    assert (len(small.eval), len(small.calibration)) == (3, 10)  # the asked-for 1:4 proportion
    assert sorted(small.eval + small.calibration) == list(range(13))
    assert "only 13 conversations" in small.shortfall and "holding out 3" in small.shortfall

    assert len(split_conversations(2, 32, 128).eval) == 1  # one held out, one to calibrate on
    no_eval = split_conversations(5, eval_samples=0, num_samples=3)
    assert no_eval.eval == [] and len(no_eval.calibration) == 3 and no_eval.shortfall is None
    with pytest.raises(UserError, match="at least 2"):
        split_conversations(1, 32, 128)


def test_perplexity_is_exp_mean_cross_entropy_over_trained_tokens(model_dirs, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"), dtype=torch.float32).eval()
    first = list(range(100, 120))
    second = list(range(300, 330))
    samples = Samples([first, second], [[-100] * 12 + first[12:], [-100] * 5 + second[5:]], conversations=2)
    nll = 0.0
    for ids, labels in zip(samples.input_ids, samples.labels, strict=True):
        with torch.no_grad():  # transformers' own loss: mean over the shifted labels != -100
            nll += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * (
                sum(label != -100 for label in labels[1:]))
    result = perplexity(model, samples)
    assert result.tokens == 8 + 25
    assert result.value == pytest.approx(math.exp(nll / result.tokens), rel=1e-5)
    monkeypatch.setattr(samples_module, "accepts_logits_to_keep", lambda model: False)  # models without logits_to_keep
    assert perplexity(model, samples).value == pytest.approx(result.value, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_reloads_quantized_and_close_to_float(model_dirs, tmp_path, bits):
    source = model_dirs("qwen2")
    out = tmp_path / f"gptq-int{bits}"
    proc = quantize(source, out, bits, tmp_path / "cache")
    assert "perplexity" in proc.stdout and f"GPTQ {bits}-bit" in proc.stdout

    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("gptq", bits, GROUP_SIZE)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    float_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    # every linear layer of the decoder (2 layers x q k v o gate up down) is a packed GPTQ module
    assert quantized_linear_count(model) == 14
    q_proj = model.model.layers[0].self_attn.q_proj
    assert hasattr(q_proj, "qweight") and not isinstance(q_proj, torch.nn.Linear)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(source).chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == json.loads((source / "generation_config.json").read_text())["eos_token_id"]
    assert generation.get("do_sample", False) is False  # GPTQModel's own generation config turns sampling on

    quantized_logits, float_logits = logits(model, tok), logits(float_model, tok)
    assert torch.isfinite(quantized_logits).all()
    error = relative_error(quantized_logits, float_logits)
    assert error < MAX_LOGIT_ERROR[bits]
    rtn_error = relative_error(logits(round_to_nearest(float_model, bits), tok), float_logits)
    assert error < 0.95 * rtn_error, (error, rtn_error)  # calibrated GPTQ beats uncalibrated rounding

    report = json.loads((out / "gptq_report.json").read_text())
    assert (report["bits"], report["source"], report["engine"].split()[0]) == (bits, "model", "gptqmodel")
    assert (report["eval_conversations"], report["calibration_conversations"]) == (3, 8)
    assert report["shortfall"] is None and report["eval_trained_tokens"] > 0
    before, after = report["perplexity_before"], report["perplexity_after"]
    assert math.isfinite(before) and math.isfinite(after) and before > 1 and after > 1
    assert report["relative_change"] == pytest.approx((after - before) / before)
    assert abs(report["relative_change"]) < MAX_PERPLEXITY_CHANGE[bits]


@torch.no_grad()
def round_to_nearest(model, bits):
    """The float model with every decoder linear rounded to GPTQ's grid (symmetric, groups of GROUP_SIZE inputs, zero
    point 2^(bits-1)) without any calibration: the baseline a GPTQ calibration must improve on."""
    import copy

    rounded = copy.deepcopy(model)
    maxq = 2**bits - 1
    for module in rounded.model.layers.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight.view(module.out_features, -1, GROUP_SIZE)
        scale = (2 * w.abs().amax(-1, keepdim=True) / maxq).clamp(min=1e-8)
        zero = (maxq + 1) / 2
        q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
        module.weight.copy_((scale * (q - zero)).view_as(module.weight))
    return rounded


@pytest.fixture(scope="module")
def adapter(model_dirs, tmp_path_factory):
    """A LoRA adapter trained two steps by finetune's run() on the tiny qwen2 (an adapter dir as users have it)."""
    from chattune.train.args import parse_args
    from chattune.train.run import run

    root = tmp_path_factory.mktemp("gptq-adapter")
    run(*parse_args([
        "--model_name_or_path", str(model_dirs("qwen2")), "--data_path", str(DATA), "--output_dir", str(root / "lora"),
        "--use_lora", "--lora_r", "8", "--max_steps", "2", "--learning_rate", "3e-2", "--use_cpu", "True",
        "--report_to", "none", "--preview_data", "0", "--save_strategy", "no", "--data_cache_dir", str(root / "cache"),
    ]))
    return root / "lora"


@pytest.mark.slow
def test_adapter_dir_is_folded_then_quantized(model_dirs, adapter, tmp_path):
    from chattune.export.merge import load_for_inference

    out = tmp_path / "gptq-from-adapter"
    quantize(adapter, out, 8, tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert quantized_linear_count(model) == 14
    assert tok.chat_template == AutoTokenizer.from_pretrained(adapter).chat_template
    merged, _ = load_for_inference(str(adapter), dtype=torch.float32, merge=True)
    base = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"), dtype=torch.float32)
    quantized_logits = logits(model, tok)
    # close to base + adapter, far from the base alone (measured: 0.018 vs 0.61): the adapter was folded in
    to_merged = relative_error(quantized_logits, logits(merged, tok))
    to_base = relative_error(quantized_logits, logits(base, tok))
    assert to_merged < MAX_LOGIT_ERROR[8] and to_base > 10 * to_merged
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == json.loads((adapter / "generation_config.json").read_text())["eos_token_id"]
    info = json.loads((out / "chattune.json").read_text())
    assert info["mode"] == "lora" and info["quantized_from"] == str(adapter) and info["gptq"]["bits"] == 8
    report = json.loads((out / "gptq_report.json").read_text())
    assert report["source"] == "adapter" and math.isfinite(report["perplexity_after"])
    assert not list(tmp_path.glob(".chattune-merged-*"))  # the folded copy made for GPTQModel is removed


@pytest.mark.slow
def test_user_errors_exit_with_a_message_and_no_traceback(model_dirs, tmp_path):
    proc = script("run_gptq.py", "--model_name_or_path", tmp_path / "missing", "--data_path", DATA,
                  "--out_path", tmp_path / "out", "--bits", 3, rc=2)
    assert "no such directory" in proc.stderr and "--bits 3: choose 4 or 8" in proc.stderr
    assert "2 problems" in proc.stderr and "Traceback" not in proc.stderr

    one = tmp_path / "one.json"
    one.write_text(json.dumps(json.loads(DATA.read_text())[:1]))
    for data, message in [(one, "at least 2 are needed"), (tmp_path / "none.json", "none.json")]:
        proc = script("run_gptq.py", "--model_name_or_path", model_dirs("qwen2"), "--data_path", data,
                      "--out_path", tmp_path / "out", "--data_cache_dir", tmp_path / "cache", rc=2)
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "out").exists()  # nothing written before the data is known to be usable


@pytest.mark.slow
def test_qlora_on_a_gptq_base_trains_and_the_adapter_reproduces_it(model_dirs, tmp_path):
    """Qwen's own Q-LoRA path (Qwen-7B-Chat-Int4): LoRA on a GPTQ int4 base, here one made by run_gptq.py. The
    default all-linear targets resolve to the quantized linears, the kernel has a backward, the adapter reloads."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import GPTQConfig

    from chattune.train.args import parse_args
    from chattune.train.run import run

    base = tmp_path / "gptq-int4"
    quantize(model_dirs("qwen2"), base, 4, tmp_path / "cache")
    out = tmp_path / "qlora"
    trainer = run(*parse_args([
        "--model_name_or_path", str(base), "--data_path", str(DATA), "--output_dir", str(out), "--use_lora",
        "--q_lora", "--lora_r", "8", "--max_steps", "2", "--learning_rate", "3e-2", "--use_cpu", "True",
        "--report_to", "none", "--preview_data", "0", "--save_strategy", "no", "--logging_steps", "1",
        "--data_cache_dir", str(tmp_path / "cache"), "--per_device_train_batch_size", "4"]))
    history = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(history) == 2 and history[1] != history[0]
    adapter_weights = load_file(str(out / "adapter_model.safetensors"))
    assert len(adapter_weights) == 2 * 7 * 2  # A and B on q k v o gate up down of both layers: the quantized ones
    assert all(v.abs().sum() > 0 for k, v in adapter_weights.items() if "lora_B" in k)
    report = json.loads((out / "run_report.json").read_text())
    assert report["plan"]["mode"] == "qlora" and "gptq base" in " ".join(report["plan"]["notes"])

    trained = trainer.model.eval()
    tok = AutoTokenizer.from_pretrained(out)
    fresh = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=GPTQConfig(bits=4, backend="gptq_torch"))
    reloaded = PeftModel.from_pretrained(fresh, out).eval()
    torch.testing.assert_close(logits(reloaded, tok), logits(trained, tok))


def test_a_model_carrying_held_out_conversations_is_evaluated_on_them_and_never_calibrated_on_them(model_dirs,
                                                                                                   tmp_path):
    """finetune.py --val_size writes val.jsonl; merge and GPTQ carry it: run_gptq.py measures perplexity on exactly
    those conversations and calibrates on the others of --data_path."""
    import shutil

    from chattune.data.load import load_conversations
    from chattune.data.split import conversation_record
    from chattune.data.tokenizer import prepare_tokenizer

    model = tmp_path / "merged"
    shutil.copytree(model_dirs("qwen2"), model)
    every = load_conversations(DATA).conversations
    held = [every[i] for i in (1, 5, 11)]
    (model / "val.jsonl").write_text("".join(json.dumps(conversation_record(c)) + "\n" for c in held))
    tokenizer, setup = prepare_tokenizer(str(model), "auto")
    args = gptq.GptqArgs(str(model), str(DATA), str(tmp_path / "out"), num_samples=128, eval_samples=32,
                         max_len=256, data_cache_dir=str(tmp_path / "cache"))
    data = gptq.build_data(args, tokenizer, setup, {})
    assert (data.eval.conversations, data.calibration.conversations) == (3, 10)

    def ids(conversations):
        return prepared_ids(conversations, tokenizer, setup, 256, tmp_path / "cache")

    assert sorted(map(tuple, data.eval.input_ids)) == ids(held)
    others = [c for i, c in enumerate(every) if i not in (1, 5, 11)]
    assert sorted(map(tuple, data.calibration.input_ids)) == ids(others)
    assert not set(map(tuple, data.eval.input_ids)) & set(map(tuple, data.calibration.input_ids))


def test_pairs_calibrate_and_are_evaluated_on_their_chosen_conversations(model_dirs, tmp_path):
    """After DPO (finetune.py --stage dpo --val_size), merge and GPTQ carry held-out pairs: run_gptq.py measures
    perplexity on their chosen conversations and calibrates on the chosen side of the other pairs, never a rejected
    answer and never a held-out pair."""
    import shutil

    from chattune.data.load import load_conversations
    from chattune.data.split import conversation_record
    from chattune.data.tokenizer import prepare_tokenizer

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {k} plus one?"}],
        "chosen": {"role": "assistant", "content": f"It is {k + 1}."},
        "rejected": {"role": "assistant", "content": f"It is {k + 2}, I think."}}) + "\n" for k in range(20)))
    model = tmp_path / "merged"
    shutil.copytree(model_dirs("qwen2"), model)
    every = load_conversations(pairs, pairs=True).conversations
    held = [every[i] for i in (0, 7, 19)]
    (model / "val.jsonl").write_text("".join(json.dumps(conversation_record(c)) + "\n" for c in held))
    tokenizer, setup = prepare_tokenizer(str(model), "auto")
    args = gptq.GptqArgs(str(model), str(pairs), str(tmp_path / "out"), num_samples=128, eval_samples=32,
                         max_len=512, data_cache_dir=str(tmp_path / "cache"))
    data = gptq.build_data(args, tokenizer, setup, {})
    assert (data.eval.conversations, data.calibration.conversations) == (3, len(every) - 3)

    def ids(conversations):  # the chosen conversation of each pair, as SFT would train it
        chosen = [dataclasses.replace(c, rejected=None) for c in conversations]
        return prepared_ids(chosen, tokenizer, setup, 512, tmp_path / "cache")

    assert sorted(map(tuple, data.eval.input_ids)) == ids(held)
    assert sorted(map(tuple, data.calibration.input_ids)) == ids([c for i, c in enumerate(every) if i not in (0, 7, 19)])


def prepared_ids(conversations, tokenizer, setup, max_length, cache):
    """The sorted input ids of the conversations as the training pipeline prepares them."""
    from chattune.data.prepare import prepare_dataset

    prepared = prepare_dataset(conversations, tokenizer, stop_tokens=setup.stop_tokens, max_length=max_length,
                               cache_dir=cache).dataset
    return sorted(map(tuple, prepared["input_ids"]))
