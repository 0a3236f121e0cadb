"""check_deploy.py: a LoRA run with --val_size, its merged model and its GPTQ model pass the deploy check; an
artifact tampered in one way fails exactly that check (exit 1); bad input is exit 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import forkrun
import pytest
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
# every test here runs in one test process (pytest -n 2 --dist loadgroup), so `artifacts` (a training run, its merge
# and its GPTQ model: over a minute) is built once
pytestmark = pytest.mark.xdist_group("deploy")


def script(name, *args):
    return forkrun.script(name, *args, rc=None)


def check_args(run, artifact=None, *extra) -> list[str]:
    return [str(a) for a in ("--run_dir", run, *(["--model_path", artifact] if artifact else []), *extra)]


def check_cli(run, artifact=None, *extra):
    """check_deploy.py as a user runs it: its own process."""
    return script("check_deploy.py", *check_args(run, artifact, *extra))


def check(run, artifact=None, *extra):
    """check_deploy.py's main() in this process, with its exit code and output as check_cli returns them: the same
    code without the seconds each new interpreter spends importing torch, transformers and peft (the CLI entry itself
    is run by check_cli in the tests of the shipped artifacts, of bad input, and of vLLM)."""
    import contextlib
    import io

    import check_deploy

    args = check_args(run, artifact, *extra)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = check_deploy.main(args)
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(["check_deploy.py", *args], code, out.getvalue(), err.getvalue())


def write_data(path: Path) -> Path:
    """Short arithmetic answers: a tiny random model learns in a few epochs to answer in this shape and stop."""
    with path.open("w") as f:
        for k in range(48):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {k} plus one?"},
                                             {"role": "assistant", "content": f"It is {k + 1}."}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def artifacts(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    data = write_data(root / "data.jsonl")
    run = root / "run"
    proc = forkrun.run([
        "finetune.py", "--model_name_or_path", str(model_dirs("qwen2")), "--data_path", str(data),
        "--output_dir", str(run), "--use_lora", "--lora_r", "16", "--use_cpu", "True", "--num_train_epochs", "8",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--val_size", "8", "--save_strategy", "no",
        "--preview_data", "0", "--data_cache_dir", str(root / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = root / "merged"
    assert script("merge_lora.py", "--adapter_path", run, "--output_path", merged).returncode == 0
    gptq = root / "gptq"
    proc = script("run_gptq.py", "--model_name_or_path", merged, "--data_path", data, "--out_path", gptq,
                  "--bits", 8, "--group_size", 32, "--num_samples", 16, "--max_len", 256, "--data_cache_dir",
                  root / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "run": run, "merged": merged, "gptq": gptq, "data": data}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["run", "merged", "gptq"])
def test_the_adapter_the_merged_and_the_gptq_model_pass(artifacts, which):
    artifact = artifacts[which]
    proc = (check_cli if which == "run" else check)(artifacts["run"], artifact if which != "run" else None)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for name in ("prompt", "stop", "quality"):
        assert f"PASS  {name}" in proc.stdout
    report = json.loads((artifact / "deploy_check.json").read_text())
    assert report["passed"] and report["conversations"] == 8 and report["data"].endswith("val.jsonl")
    stop = next(c for c in report["checks"] if c["name"] == "stop")
    assert stop["values"]["stopped"] == stop["values"]["sampled"] == 8
    quality = next(c for c in report["checks"] if c["name"] == "quality")["values"]
    if which == "merged":
        assert abs(quality["relative_change"]) < 1e-4  # fp32 merge: exact up to rounding
    if which == "gptq":
        assert "GPTQ model" in proc.stdout and quality["allowed"] == 0.05
    if which != "run":  # the held-out split travelled with the model (merge, then GPTQ copied it) ...
        assert (artifact / "val.jsonl").read_bytes() == (artifacts["run"] / "val.jsonl").read_bytes()
    if which == "gptq":  # ... and run_gptq.py measured perplexity on it, calibrating on the other conversations
        gptq = json.loads((artifact / "gptq_report.json").read_text())
        assert (gptq["eval_conversations"], gptq["calibration_conversations"]) == (8, 16)


@pytest.mark.slow
def test_a_dpo_run_on_the_sft_model_passes_and_so_does_its_merge(artifacts):
    """The usual second stage: DPO (LoRA) on the merged SFT model, with held-out pairs; the deploy check reads each
    held-out pair as its chosen conversation, of the adapter and of the merged DPO model. (GPTQ of a model that
    carries held-out pairs: tests/test_gptq.py, on its data split, without running a quantization here again.)"""
    root = artifacts["root"]
    pairs = root / "pairs.jsonl"
    with pairs.open("w") as f:
        for k in range(48):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"What is {k} plus one?"}],
                                "chosen": {"role": "assistant", "content": f"It is {k + 1}."},
                                "rejected": {"role": "assistant", "content": f"It is {k + 2}."}}) + "\n")
    run = root / "dpo"
    proc = forkrun.run([
        "finetune.py", "--model_name_or_path", str(artifacts["merged"]), "--data_path", str(pairs),
        "--stage", "dpo", "--output_dir", str(run), "--use_lora", "--lora_r", "8", "--use_cpu", "True",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
        "--val_size", "8", "--save_strategy", "no", "--preview_data", "0", "--data_cache_dir", str(root / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = json.loads((run / "run_report.json").read_text())["preference"]["eval"]
    assert held["pairs"] == 8
    proc = check(run)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads((run / "deploy_check.json").read_text())
    assert report["passed"] and report["conversations"] == 8
    merged = root / "dpo-merged"
    assert script("merge_lora.py", "--adapter_path", run, "--output_path", merged).returncode == 0
    proc = check(run, merged)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert json.loads((merged / "deploy_check.json").read_text())["conversations"] == 8


def tampered(artifacts, name: str) -> Path:
    copy = artifacts["root"] / f"tampered-{name}"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(artifacts["merged"], copy)
    return copy


@pytest.mark.slow
def test_a_changed_template_fails_the_prompt_check(artifacts):
    artifact = tampered(artifacts, "template")
    template = artifact / "chat_template.jinja"
    text = template.read_text()
    generation = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"  # the generation prompt
    assert generation in text
    template.write_text(text.replace(generation, generation.replace("assistant\n", "assistant\n\n")))
    proc = check(artifacts["run"], artifact)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert "FAIL  prompt   8 of 8 prompts differ from training's" in proc.stdout
    assert "PASS  quality" in proc.stdout and "FAILED (prompt)" in proc.stdout


@pytest.mark.slow
def test_a_removed_stop_token_fails_the_stop_check(artifacts):
    artifact = tampered(artifacts, "stop")
    config = json.loads((artifact / "generation_config.json").read_text())
    config["eos_token_id"] = [151643]  # <|endoftext|> only: the trained <|im_end|> removed
    (artifact / "generation_config.json").write_text(json.dumps(config))
    proc = check(artifacts["run"], artifact)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert "FAIL  stop     generation_config.json stops on <|endoftext|>, not on the trained end-of-turn token(s) " \
           "<|im_end|>" in proc.stdout
    assert "FAILED (stop)" in proc.stdout


@pytest.mark.slow
def test_a_scaled_weight_fails_the_quality_check(artifacts):
    artifact = tampered(artifacts, "weight")
    weights = load_file(str(artifact / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = weights[name] * 1.5
    save_file(weights, str(artifact / "model.safetensors"), metadata={"format": "pt"})
    proc = check(artifacts["run"], artifact)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert "FAIL  quality" in proc.stdout and "unquantized model, allowed ±0.100%" in proc.stdout
    report = json.loads((artifact / "deploy_check.json").read_text())
    quality = next(c for c in report["checks"] if c["name"] == "quality")["values"]
    assert abs(quality["relative_change"]) > 1e-3 and not report["passed"]


@pytest.mark.slow
def test_bad_input_is_exit_2(artifacts, tmp_path):
    proc = check_cli(tmp_path)
    assert proc.returncode == 2 and "no val.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "val.jsonl").write_text((artifacts["run"] / "val.jsonl").read_text())
    proc = check(tmp_path)
    assert proc.returncode == 2 and "no chattune.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = check(artifacts["run"], tmp_path / "missing")
    assert proc.returncode == 2 and "--model_path" in proc.stderr and "not a directory" in proc.stderr


@pytest.mark.slow
def test_template_variables_of_training_are_baked_into_the_saved_template(model_dirs, tmp_path):
    """A Qwen3 run with enable_thinking false: an engine renders the saved template without variables, and must get
    the '<think>\\n\\n</think>' prompt training used; the deploy check's prompt check confirms it."""
    data = write_data(tmp_path / "data.jsonl")
    run = tmp_path / "run"
    proc = forkrun.run([
        "finetune.py", "--model_name_or_path", str(model_dirs("qwen3")), "--data_path", str(data),
        "--output_dir", str(run), "--use_lora", "--use_cpu", "True", "--max_steps", "1", "--val_size", "4",
        "--template_kwargs", '{"enable_thinking": false}', "--save_strategy", "no", "--preview_data", "0",
        "--data_cache_dir", str(tmp_path / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(run)
    prompt = saved.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                       tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    proc = check(run, None, "--stop_samples", "0")
    assert "PASS  prompt   4 prompts identical to training's" in proc.stdout, proc.stdout + proc.stderr[-2000:]


@pytest.mark.slow
def test_baking_changes_no_rendering_of_the_real_templates():
    """Rendering the baked template with or without the variables gives what the original gives with them."""
    from test_real_templates import CASES, tokenizer

    from chattune.data.chat_templates import bake_template_kwargs

    tokenizers = {}
    for family, messages, tools, kwargs in CASES:
        if family not in tokenizers:  # one per family (building one takes a second); templates passed per call
            tokenizers[family] = tokenizer(family)[0]
        tok = tokenizers[family]
        if family.startswith("qwen3"):
            kwargs = kwargs or {"enable_thinking": False}
        if not kwargs:
            continue

        def render(template, history, tok=tok, tools=tools, **variables):
            return tok.apply_chat_template(history, tools=tools, add_generation_prompt=True, tokenize=False,
                                           chat_template=template, **variables)

        original = tok.chat_template
        baked = bake_template_kwargs(original, kwargs)
        assert baked != original and bake_template_kwargs(baked, kwargs) == baked  # idempotent
        if "enable_thinking" in kwargs:  # a caller's own value still decides (an engine asked to think)
            for value in (True, False):
                assert render(baked, messages, enable_thinking=value) == render(original, messages,
                                                                               enable_thinking=value)
        for i in range(1, len(messages) + 1):
            if not any(m["role"] == "user" for m in messages[:i]):
                continue  # Qwen3.5's template refuses a history with no user query (as inference would)
            want = render(original, messages[:i], **kwargs)
            assert render(baked, messages[:i], **kwargs) == want
            assert render(baked, messages[:i]) == want


def test_quality_bounds():
    """Unquantized: a drift either way beyond 1e-3 fails; GPTQ: an increase beyond 5% fails, a decrease never."""
    from chattune.export.deploy import DeployArgs, check_quality

    args = DeployArgs("run")
    assert check_quality(2.0, 2.0 * (1 + 5e-4), 100, False, args).passed
    assert not check_quality(2.0, 2.0 * (1 + 2e-3), 100, False, args).passed
    assert check_quality(2.0, 2.0 * 1.04, 100, True, args).passed
    assert not check_quality(2.0, 2.0 * 1.06, 100, True, args).passed
    assert not check_quality(2.0, 2.0 * (1 - 2e-3), 100, False, args).passed
    assert check_quality(2.0, 1.5, 100, True, args).passed


def test_baked_defaults_are_replaced_not_stacked_and_none_is_jinja_none():
    from chattune.data.chat_templates import BAKED_MARK, bake_template_kwargs

    template = "{{ 'yes' if x is none else 'no' }}-{{ y }}"
    once = bake_template_kwargs(template, {"x": None, "y": 1})
    again = bake_template_kwargs(once, {"y": 2})
    assert again.count(BAKED_MARK) == 1 and again.endswith(template) and "y = 2" in again and "x =" not in again
    from jinja2 import Template

    assert Template(once).render() == "yes-1" and Template(once).render(y=5) == "yes-5"
    assert Template(again).render() == "no-2"


@pytest.mark.slow
def test_no_turn_to_generate_is_a_failed_stop_check_not_a_pass(artifacts):
    proc = check(artifacts["run"], None, "--max_length", "4")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert "no held-out turn fits the length limit" in proc.stdout


def _vllm_here() -> bool:
    import importlib.util

    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def test_engine_vllm_without_vllm_or_a_gpu_is_exit_2(tmp_path):
    if _vllm_here():
        pytest.skip("vLLM and a GPU are here: the gpu-marked vLLM tests run instead")
    proc = check(tmp_path, None, "--engine", "vllm")
    assert proc.returncode == 2 and "--engine vllm" in proc.stderr and "Traceback" not in proc.stderr
    assert "--engine transformers runs the same checks" in proc.stderr


def test_vllm_lora_rank_and_dtype_rules(tmp_path):
    from chattune.errors import UserError
    from chattune.export.deploy import DeployArgs, _resolve_dtypes
    from chattune.export.engines import _vllm_lora_rank

    assert [_vllm_lora_rank(r) for r in (1, 2, 8, 9, 64, 100, 512)] == [1, 8, 8, 16, 64, 128, 512]
    adapter, gptq, merged = (tmp_path / name for name in ("adapter", "gptq", "merged"))
    for folder in (adapter, gptq, merged):
        folder.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (gptq / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    (merged / "config.json").write_text("{}")

    def resolved(artifact, **kw):
        args = DeployArgs(str(tmp_path), **kw)
        _resolve_dtypes(args, str(artifact))
        return args

    # transformers: float32 on both sides whatever the artifact, and the float32 drift bound
    for artifact in (adapter, gptq, merged):
        args = resolved(artifact)
        assert (args.engine_dtype, args.dtype) == ("float32", "float32")
        assert check_quality_passes(args, 5e-4) and not check_quality_passes(args, 5e-3)
    # vLLM as `vllm serve` runs it: a LoRA in bfloat16, others in the checkpoint's 16-bit dtype; the trained model
    # in bfloat16 (float32 against GPTQ), and the 16-bit drift bound
    assert (resolved(adapter, engine="vllm").engine_dtype, resolved(adapter, engine="vllm").dtype) == (
        "bfloat16", "bfloat16")
    assert (resolved(gptq, engine="vllm").engine_dtype, resolved(gptq, engine="vllm").dtype) == ("auto", "float32")
    args = resolved(merged, engine="vllm")
    assert (args.engine_dtype, args.dtype) == ("auto", "bfloat16")
    assert check_quality_passes(args, 5e-3) and not check_quality_passes(args, 2e-2)
    for artifact in (adapter, gptq):  # 16-bit kernels: float32 is refused with the fix
        with pytest.raises(UserError, match="pass --dtype bfloat16"):
            resolved(artifact, engine="vllm", dtype="float32")
    assert resolved(merged, engine="vllm", dtype="float32").engine_dtype == "float32"


def check_quality_passes(args, change: float) -> bool:
    from chattune.export.deploy import check_quality

    return check_quality(2.0, 2.0 * (1 + change), 100, False, args).passed


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["run", "merged", "gptq"])
def test_vllm_engine_passes_the_adapter_the_merged_and_the_gptq_model(artifacts, which):
    """The same checks through vLLM's engine: its chat path feeds the trained prompt ids, its stops end the answers,
    and its loss (prompt logprobs) matches the trained model's."""
    pytest.importorskip("vllm", reason="vLLM is not installed on this GPU machine")
    report_path = artifacts["root"] / f"vllm-{which}.json"
    proc = check_cli(artifacts["run"], artifacts[which] if which != "run" else None, "--engine", "vllm",
                 "--report_path", report_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    checks = {c["name"]: c["values"] for c in report["checks"]}
    assert checks["prompt"]["engine"] == "vllm" and checks["prompt"]["mismatched"] == 0
    assert checks["stop"]["stopped"] == checks["stop"]["sampled"] == 8
    if which != "gptq":  # 16-bit in both engines (vLLM runs it as `vllm serve` does): rounding only
        assert abs(checks["quality"]["relative_change"]) < 1e-2 and report["args"]["dtype"] == "bfloat16"


@pytest.mark.gpu
def test_vllm_engine_fails_a_changed_template_and_a_removed_stop(artifacts):
    pytest.importorskip("vllm", reason="vLLM is not installed on this GPU machine")
    artifact = tampered(artifacts, "vllm-template")
    template = artifact / "chat_template.jinja"
    generation = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    template.write_text(template.read_text().replace(generation, generation.replace("assistant\n", "assistant\n\n")))
    config = json.loads((artifact / "generation_config.json").read_text())
    config["eos_token_id"] = [151643]
    (artifact / "generation_config.json").write_text(json.dumps(config))
    # vLLM also stops on the tokenizer's eos_token (<|im_end|> here): both must lose the trained stop
    tokenizer_config = artifact / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text().replace('"eos_token": "<|im_end|>"',
                                                                     '"eos_token": "<|endoftext|>"'))
    assert '"eos_token": "<|endoftext|>"' in tokenizer_config.read_text()
    proc = check_cli(artifacts["run"], artifact, "--engine", "vllm")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-4000:]
    assert "FAIL  prompt" in proc.stdout and "FAIL  stop" in proc.stdout and "PASS  quality" in proc.stdout


def test_vllm_engine_reads_the_loss_and_the_prompts_back_in_order(model_dirs, monkeypatch):
    """CPU check of VllmEngine's own arithmetic, with vLLM's documented output shapes served by a stand-in backed
    by the transformers model (vLLM itself is tested by the gpu-marked tests above): the loss from prompt logprobs
    (None first, then a dict holding the actual token and the top-1) equals the model's own shifted-label loss, and
    chat results batched per tool list come back in the requests' order."""
    import types

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chattune.export.deploy import Request
    from chattune.export.engines import VllmEngine
    from chattune.export.samples import Samples

    model = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dirs("qwen2"))
    Logprob = types.SimpleNamespace

    class StandIn:
        def generate(self, prompts, params, use_tqdm=True, lora_request=None):
            outs = []
            for prompt in prompts:
                ids = prompt["prompt_token_ids"]
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
                rows = [None] + [{ids[t]: Logprob(logprob=logp[t - 1, ids[t]].item()),
                                  int(logp[t - 1].argmax()): Logprob(logprob=logp[t - 1].max().item())}
                                 for t in range(1, len(ids))]
                outs.append(types.SimpleNamespace(prompt_logprobs=rows))
            return outs

        def chat(self, messages, params, use_tqdm=True, lora_request=None, add_generation_prompt=True, tools=None):
            return [types.SimpleNamespace(prompt_token_ids=tok.apply_chat_template(
                m, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
                for m in messages]

    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kw: kw
    fake.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    engine = object.__new__(VllmEngine)
    engine.llm, engine.lora = StandIn(), None

    first, second = list(range(100, 120)), list(range(300, 330))
    samples = Samples([first, second], [[-100] * 12 + first[12:], [-100] * 5 + second[5:]], conversations=2)
    nll = 0.0
    for ids, labels in zip(samples.input_ids, samples.labels, strict=True):
        with torch.no_grad():
            nll += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * (
                sum(label != -100 for label in labels[1:]))
    loss, tokens = engine.loss(samples, "stand-in")
    assert tokens == 8 + 25 and loss == pytest.approx(nll / tokens, rel=1e-5)

    tool = [{"type": "function", "function": {"name": "add", "description": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}]
    requests = [Request([{"role": "user", "content": f"q{k}"}], tool if k % 2 else []) for k in range(5)]
    want = [tok.apply_chat_template(r.history, tools=r.tools or None, add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for r in requests]
    assert engine.prompts(requests) == want


def test_prompts_longer_than_the_engine_takes_are_counted_not_sent(model_dirs, tmp_path):
    import types

    from transformers import AutoTokenizer

    from chattune.data.load import load_conversations
    from chattune.export.deploy import check_prompts

    tok = AutoTokenizer.from_pretrained(model_dirs("qwen2"))
    conversations = load_conversations(str(write_data(tmp_path / "d.jsonl"))).conversations[8:12]  # 8 9 10 11
    sent = []

    def prompts(requests):
        sent.extend(requests)
        return [tok.apply_chat_template(r.history, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"] for r in requests]

    lengths = sorted(len(tok.apply_chat_template(c.messages[:1], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]) for c in conversations)
    engine = types.SimpleNamespace(name="stand-in", max_prompt_tokens=lengths[1], prompts=prompts)
    check = check_prompts(conversations, tok, {}, engine)
    longer = sum(n > lengths[1] for n in lengths)
    assert check.passed and check.values["too_long"] == longer > 0 and len(sent) == 4 - longer
    assert f"{longer} longer than stand-in takes" in check.detail
    engine.max_prompt_tokens = 1  # nothing fits: nothing was checked, which is no pass
    check = check_prompts(conversations, tok, {}, engine)
    assert not check.passed and check.detail.startswith("no prompt could be checked")


def test_cli_flags_parse_as_the_other_scripts_do():
    sys.path.insert(0, str(ROOT))
    from check_deploy import parse_args

    assert parse_args(["--run_dir", "r"]).trust_remote_code is True
    assert parse_args(["--run_dir", "r", "--trust_remote_code", "false"]).trust_remote_code is False
    with pytest.raises(SystemExit):
        parse_args(["--run_dir", "r", "--trust_remote_code", "maybe"])
    with pytest.raises(SystemExit):
        parse_args(["--run_dir", "r", "--engine", "tgi"])
