"""merge_lora.py and chat.py: merged logits equal base+adapter, refusals, and batch chat for every model kind."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import forkrun
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from chattune.export.merge import load_adapter_model
from chattune.train.args import parse_args
from chattune.train.run import run

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "sharegpt.json"


def script(name, *args, rc=0):
    return forkrun.script(name, *args, rc=rc)


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory):
    """Tiny adapters trained a few steps: (family, template) -> output dir."""
    root = tmp_path_factory.mktemp("adapters")
    made = {}

    def get(family, template="auto"):
        if (family, template) not in made:
            out = root / f"{family}-{template}"
            run(*parse_args([
                "--model_name_or_path", str(model_dirs(family)), "--data_path", str(DATA), "--output_dir", str(out),
                "--use_lora", "--lora_r", "8", "--max_steps", "3", "--learning_rate", "3e-2", "--use_cpu", "True",
                "--report_to", "none", "--preview_data", "0", "--save_strategy", "no", "--template", template,
                "--data_cache_dir", str(root / "cache"),
            ]))
            made[(family, template)] = out
        return made[(family, template)]

    return get


@torch.no_grad()
def logits(model, tok):
    batch = tok.apply_chat_template([{"role": "user", "content": "Name the largest planet."}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return model(**batch).logits.float()


@pytest.mark.slow
@pytest.mark.parametrize("family,template", [("qwen2", "auto"), ("deepseek", "auto"), ("deepseek", "chatml")])
def test_merged_logits_equal_base_plus_adapter(model_dirs, adapters, tmp_path, family, template):
    adapter = adapters(family, template)
    out = tmp_path / "merged"
    script("merge_lora.py", "--adapter_path", adapter, "--output_path", out, "--dtype", "float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    reference, _ = load_adapter_model(str(adapter), dtype=torch.float32)
    torch.testing.assert_close(logits(merged, tok), logits(reference.eval(), tok), rtol=1e-4, atol=1e-4)
    # not silently equal to its base: the adapted projections moved
    base = load_file(str(model_dirs(family) / "model.safetensors"))
    merged_state = load_file(str(out / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged_state[key], base[key])
    assert json.loads((out / "chattune.json").read_text())["mode"] == "lora"
    assert tok.chat_template == AutoTokenizer.from_pretrained(adapter).chat_template
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == json.loads((adapter / "generation_config.json").read_text())["eos_token_id"]


@pytest.mark.slow
def test_merge_refuses_quantized_base_and_untrained_adapter(model_dirs, adapters, tmp_path):
    adapter = adapters("qwen2")
    quantized = tmp_path / "base-4bit"
    shutil.copytree(model_dirs("qwen2"), quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    proc = script("merge_lora.py", "--adapter_path", adapter, "--output_path", tmp_path / "x",
                  "--base_model_name_or_path", quantized, rc=2)
    assert "Merge into the full-precision base model instead" in proc.stderr and "Traceback" not in proc.stderr
    untrained = tmp_path / "untrained"
    shutil.copytree(adapter, untrained)
    weights = load_file(str(untrained / "adapter_model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              str(untrained / "adapter_model.safetensors"))
    proc = script("merge_lora.py", "--adapter_path", untrained, "--output_path", tmp_path / "y", rc=2)
    assert "the merged model would equal its base" in proc.stderr
    proc = script("merge_lora.py", "--adapter_path", model_dirs("qwen2"), "--output_path", tmp_path / "z", rc=2)
    assert "holds no adapter_config.json" in proc.stderr


@pytest.mark.slow
def test_chat_answers_a_batch_for_every_model_kind(model_dirs, adapters, tmp_path):
    adapter = adapters("qwen2")
    merged = tmp_path / "merged"
    script("merge_lora.py", "--adapter_path", adapter, "--output_path", merged)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n'
                       '{"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},'
                       ' {"role": "user", "content": "C"}]}\n')
    answers = {}
    import chat  # its main() in this process (the CLI entry runs below, and in the merge script's own process above)

    for kind, args in {"adapter dir": [adapter], "base + adapter": [model_dirs("qwen2"), "--adapter_path", adapter],
                       "merged": [merged]}.items():
        out = tmp_path / f"{kind}.jsonl"
        assert chat.main(["--model_name_or_path", *map(str, args), "--input_file", str(prompts), "--output_file",
                          str(out), "--max_new_tokens", "6"]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == ["Hi", "C"] and all(isinstance(r["response"], str) for r in rows)
        answers[kind] = rows
    # greedy decoding: the three ways of loading the same weights answer the same
    assert answers["adapter dir"] == answers["base + adapter"] == answers["merged"]
    proc = script("chat.py", "--model_name_or_path", tmp_path / "missing", "--prompt", "x", rc=2)
    assert "no such directory" in proc.stderr


@pytest.mark.parametrize("flag", ["true", "false"])
def test_trust_remote_code_flag_reaches_every_load(model_dirs, adapters, tmp_path, monkeypatch, flag):
    """merge_lora.py and chat.py pass the user's --trust_remote_code to every config, model and tokenizer load; so do
    run_gptq.py's arguments and the memory planner's meta-device model."""
    import transformers

    import chat
    import merge_lora
    import run_gptq
    from chattune.train.memory import shape_from_config

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    adapter = adapters("qwen2")
    assert merge_lora.main(["--adapter_path", str(adapter), "--output_path", str(tmp_path / "merged"),
                            "--trust_remote_code", flag]) == 0
    assert chat.main(["--model_name_or_path", str(adapter), "--prompt", "Hi", "--max_new_tokens", "2",
                      "--output_file", str(tmp_path / "answers.jsonl"), "--trust_remote_code", flag]) == 0
    assert len(seen) >= 5 and set(seen) == {flag == "true"}
    gptq_args = run_gptq.parse_args(["--model_name_or_path", "m", "--data_path", "d", "--out_path", "o",
                                     "--trust_remote_code", flag])
    assert gptq_args.trust_remote_code is (flag == "true")
    config = transformers.AutoConfig.from_pretrained(model_dirs("qwen2"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        classmethod(lambda klass, c, **kw: seen.append(("from_config", kw["trust_remote_code"]))
                                    or transformers.Qwen2ForCausalLM(c)))
    shape_from_config(config, trust_remote_code=flag == "true")
    assert seen[-1] == ("from_config", flag == "true")


_STALL_IN_SAVE = """
import sys, time
sys.path.insert(0, sys.argv[1])
import chattune.export.merge as merge
def stalled(model, tokenizer, out, **kw):  # the weights written, then stuck as a long write would be
    model.save_pretrained(out)
    print("WROTE", flush=True)
    time.sleep(600)
merge.save_model = stalled
import merge_lora
sys.exit(merge_lora.main(sys.argv[2:]))
"""


def test_a_merge_killed_mid_write_leaves_no_model_and_the_next_one_cleans_up(adapters, tmp_path):
    """A real kill -9 of merge_lora.py after config.json and the weights are written: --output_path does not exist
    (nothing that looks like a model), and the next merge into it succeeds and removes the dead one's staging."""
    import os
    import signal

    adapter, out = adapters("qwen2"), tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-c", _STALL_IN_SAVE, str(ROOT), "--adapter_path", str(adapter),
                             "--output_path", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert "WROTE\n" in iter(proc.stdout.readline, "")  # DeepSpeed may log a line first
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.partial-")]
        assert len(partial) == 1 and (partial[0] / "config.json").is_file()  # killed mid-write, for real
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    script("merge_lora.py", "--adapter_path", adapter, "--output_path", out)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")], list(tmp_path.iterdir())
    AutoModelForCausalLM.from_pretrained(out)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    proc = script("merge_lora.py", "--adapter_path", adapter, "--output_path", tmp_path / "notes", rc=2)
    assert "holds something other than a model" in proc.stderr and (tmp_path / "notes" / "todo.txt").exists()
    script("merge_lora.py", "--adapter_path", adapter, "--output_path", out)  # a merge run again replaces its model
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]


@pytest.mark.slow
def test_merge_refuses_a_base_of_the_same_shapes_with_other_weights(model_dirs, adapters, tmp_path):
    """Such an adapter loads into it without a word and serves nonsense; the run recorded its base's fingerprint."""
    from test_checkpoints import other_weights

    adapter = adapters("qwen2")
    other = other_weights(model_dirs("qwen2"), tmp_path / "other-base")
    proc = script("merge_lora.py", "--adapter_path", adapter, "--output_path", tmp_path / "m",
                  "--base_model_name_or_path", other, rc=2)
    assert f"whose weights differ from {other}'s" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()
