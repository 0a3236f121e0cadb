"""Today's Qwen (3.5 / 3.6 / 3.8): a vision-language checkpoint with an MTP head, trained on its text path and saved
in its own layout. Tiny random Qwen3_5ForConditionalGeneration checkpoints (dense and MoE) with a vision tower and
`mtp.*` tensors written into the file, the published Qwen3.5 template (tests/fixtures.py)."""

import json
import sys
from pathlib import Path

import forkrun
import pytest
import torch
from safetensors import safe_open

from chattune.train.args import parse_args
from chattune.train.layout import PROCESSOR_FILES, layout_problems, weight_files
from chattune.train.run import run

ROOT = Path(__file__).resolve().parents[1]
# one test process (pytest -n 2 --dist loadgroup): `lora_run`, a LoRA run of the tiny Qwen3.5, is built once
pytestmark = pytest.mark.xdist_group("qwen35")
DATA = ROOT / "examples" / "messages.jsonl"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, file in weight_files(str(path)).items():
        with safe_open(file, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def train(model_dir: Path, out: Path, *extra) -> object:
    return run(*parse_args(["--model_name_or_path", str(model_dir), "--data_path", str(DATA), "--output_dir",
                            str(out), "--use_cpu", "True", "--max_steps", "2", "--learning_rate", "0.05",
                            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none",
                            "--preview_data", "0", "--data_cache_dir", str(out.parent / "cache"),
                            "--model_max_length", "512", *map(str, extra)]))


@pytest.fixture(scope="module")
def lora_run(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen35") / "lora"
    trainer = train(model_dirs("qwen3_5"), out, "--use_lora", "--lora_r", "8")
    return model_dirs("qwen3_5"), out, trainer


def test_the_checkpoint_class_is_trained_and_the_adapter_loads_into_it(lora_run):
    base, out, trainer = lora_run
    report = json.loads((out / "run_report.json").read_text())
    assert type(trainer.model.get_base_model()).__name__ == "Qwen3_5ForConditionalGeneration"
    saved = list(tensors(out))
    assert saved and all(".language_model.layers." in n for n in saved if "lora_" in n)
    assert not any("visual" in n for n in saved)  # the vision tower is not adapted
    kinds = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in saved if "lora_A" in n}
    assert {"in_proj_qkv", "out_proj", "q_proj", "o_proj", "down_proj"} <= kinds  # Gated DeltaNet + attention + MLP
    assert report["plan"]["trainable_params"] > 0

    from peft import PeftModel
    from transformers import Qwen3_5ForConditionalGeneration

    reloaded = PeftModel.from_pretrained(Qwen3_5ForConditionalGeneration.from_pretrained(base, dtype=torch.float32),
                                         out).eval()
    loaded = {n for n, _ in reloaded.named_parameters() if "lora_" in n}
    trained = {n for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert loaded == trained  # every LoRA module of the run matched a module of the checkpoint's class
    ids = torch.tensor([[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_merge_keeps_the_checkpoints_layout_vision_tower_and_mtp_head(lora_run, tmp_path):
    base, adapter, _ = lora_run
    merged = tmp_path / "merged"
    proc = forkrun.script("merge_lora.py", "--adapter_path", adapter, "--output_path", merged)
    assert "tensors of the base that transformers does not load, e.g. mtp." in proc.stderr
    config, base_config = (json.loads((p / "config.json").read_text()) for p in (merged, base))
    for key in ("architectures", "model_type"):
        assert config[key] == base_config[key], key
    ignore = ("dtype", "transformers_version")  # what transformers itself writes on every save
    assert ({k: v for k, v in config["vision_config"].items() if k not in ignore}
            == {k: v for k, v in base_config["vision_config"].items() if k not in ignore})
    before, after = tensors(base), tensors(merged)
    assert set(after) == set(before) and layout_problems(str(merged), str(base)) == []
    untrained = [n for n in before if n.startswith("mtp.") or ".visual." in n]
    assert any(n.startswith("mtp.") for n in untrained) and any(".visual." in n for n in untrained)
    for name in untrained:  # byte for byte: same dtype, same values
        assert after[name].dtype == before[name].dtype and torch.equal(after[name], before[name]), name
    assert any(not torch.equal(after[n], before[n]) for n in before if ".language_model.layers." in n)
    for name in PROCESSOR_FILES[:2]:  # what a server reads to build the image/video processor
        assert (merged / name).read_text() == (base / name).read_text(), name


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_full_fine_tuning_saves_every_base_tensor_with_the_untrained_ones_as_they_were(family, model_dirs,
                                                                                    tmp_path):
    base = model_dirs(family)
    out = tmp_path / "full"
    train(base, out)
    before, after = tensors(base), tensors(out)
    assert set(after) == set(before) and layout_problems(str(out), str(base)) == []
    assert all((out / name).is_file() for name in PROCESSOR_FILES[:2])
    for name in (n for n in before if n.startswith("mtp.") or ".visual." in n):
        assert after[name].dtype == before[name].dtype and torch.equal(after[name], before[name]), name
    changed = [n for n in before if ".language_model.layers." in n and not torch.equal(after[n].to(before[n].dtype),
                                                                                     before[n])]
    assert changed  # the text path trained
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "Qwen3_5ForConditionalGeneration" if family == "qwen3_5" else "Qwen3_5MoeForConditionalGeneration"]


@pytest.mark.slow
def test_the_deploy_check_names_what_a_merge_lost(lora_run, tmp_path):
    from chattune.export.deploy import check_layout

    base, adapter, _ = lora_run
    merged = tmp_path / "merged"
    forkrun.script("merge_lora.py", "--adapter_path", adapter, "--output_path", merged)
    assert check_layout(str(merged), str(adapter)).passed
    assert check_layout(str(adapter), str(adapter)).passed  # every adapter module matches the checkpoint's class
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("mtp.")}
    (merged / "model.safetensors.index.json").write_text(json.dumps(index))  # a merge that dropped the MTP head
    check = check_layout(str(merged), str(adapter))
    assert not check.passed and "3 of the base's" in check.detail and "mtp." in check.detail
    (merged / "video_preprocessor_config.json").unlink()
    assert "video_preprocessor_config.json of the base is missing" in check_layout(str(merged), str(adapter)).detail
    config = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3_5ForCausalLM"]}))
    assert "architectures is ['Qwen3_5ForCausalLM']" in check_layout(str(merged), str(adapter)).detail


def test_gptq_of_a_vision_language_checkpoint_says_what_it_needs_before_loading(model_dirs, tmp_path, monkeypatch):
    """GPTQModel builds Qwen3.5's video processor, which needs a torchvision matching torch: refused up front, not
    after the float model was loaded and evaluated."""
    from chattune.errors import ConfigError
    from chattune.export.gptq import check_processor_support

    check_processor_support(str(model_dirs("qwen2")))  # a text-only checkpoint needs no processor
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    with pytest.raises(ConfigError, match="vision-language checkpoint.*torchvision built for your torch"):
        check_processor_support(str(model_dirs("qwen3_5")))


@pytest.mark.slow
def test_qlora_trains_the_text_path_of_the_checkpoint_class_and_the_adapter_loads_into_it(model_dirs, tmp_path):
    """Q-LoRA (NF4 base, bitsandbytes on CPU) of the vision-language checkpoint: the text path's linear layers are
    4-bit, the adapter is on the text path only and loads into the checkpoint's own class with every module matched
    and trained."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import Qwen3_5ForConditionalGeneration

    base = model_dirs("qwen3_5")
    out = tmp_path / "qlora"
    trainer = train(base, out, "--use_lora", "--q_lora", "--bf16", "True", "--lora_r", "8")
    model = trainer.model
    assert type(model.get_base_model()).__name__ == "Qwen3_5ForConditionalGeneration"
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(".language_model.layers." in n for n in four_bit)  # (the vision tower, never run on text, too)
    saved = tensors(out)
    assert saved and all(".language_model.layers." in n for n in saved)
    assert all(t.abs().max() > 0 for n, t in saved.items() if "lora_B" in n)  # B starts at zero: it trained
    reloaded = PeftModel.from_pretrained(Qwen3_5ForConditionalGeneration.from_pretrained(base, dtype=torch.float32),
                                         out)
    loaded = {n for n, _ in reloaded.named_parameters() if "lora_" in n}
    assert loaded == {n for n, _ in model.named_parameters() if "lora_" in n}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_zero3_saves_the_checkpoints_layout_whole(mode, model_dirs, tmp_path):
    """Two ZeRO-3 processes (CPU, gloo) train the vision-language checkpoint. LoRA: the adapter holds every tensor at
    its full shape, named in the checkpoint's layout, equal to the trained values DeepSpeed's own checkpoint holds.
    Full: every base tensor is saved whole under its own name (transformers' ZeRO-3 save renamed the text path to
    model.language_model.model.language_model.*: chattune.train.hf.keep_used_weight_conversions), the vision tower
    and MTP head byte for byte as they were, the text path trained from the base's values, the config the base's."""
    from safetensors.torch import load_file
    from test_distributed import recovered_from_checkpoint

    base = model_dirs("qwen3_5")
    out = tmp_path / "zero3"
    args = ["finetune.py", "--model_name_or_path", str(base), "--data_path", str(DATA), "--use_cpu", "True",
            "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-3",
            "--report_to", "none", "--preview_data", "0", "--data_cache_dir", str(tmp_path / "cache"), "--seed", "0",
            "--model_max_length", "512", "--output_dir", str(out), "--deepspeed", "ds_configs/zero3.json",
            "--per_device_train_batch_size", "2"]
    proc = forkrun.torchrun([*args, *(["--use_lora", "--lora_r", "8"] if mode == "lora" else [])])
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [h["loss"] for h in history if "loss" in h]
    # the summary is the mean over both ranks (the last steps were rank 0's own share before they were logged)
    assert logged and history[-1]["train_loss"] == pytest.approx(logged[-1], rel=1e-6)
    if mode == "lora":
        saved = load_file(str(out / "adapter_model.safetensors"))
        trained = {n.replace(".default.", "."): t for n, t in recovered_from_checkpoint(out / "checkpoint-2").items()}
        assert set(saved) == set(trained) and all(".language_model.layers." in n for n in saved)
        for name, tensor in saved.items():
            assert tensor.shape == trained[name].shape and 8 in tensor.shape, name  # whole, not ZeRO-3 shards
            torch.testing.assert_close(tensor, trained[name], rtol=1e-5, atol=1e-6)
            if "lora_B" in name:
                assert tensor.abs().max() > 0, f"{name} is still at its zero initialization"
        return
    before, after = tensors(base), tensors(out)
    assert set(after) == set(before) and layout_problems(str(out), str(base)) == []
    for name, tensor in before.items():
        assert after[name].shape == tensor.shape, name  # whole tensors, not ZeRO-3's empty shards
        if name.startswith("mtp.") or ".visual." in name:
            assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
        else:  # two steps at 1e-3 from the base's values, not from a fresh initialization
            assert (after[name].float() - tensor.float()).abs().max() < 0.01, name
    assert any(not torch.equal(after[n].to(before[n].dtype), before[n]) for n in before
               if ".language_model.layers." in n)
    config, base_config = (json.loads((p / "config.json").read_text()) for p in (out, base))
    assert config["architectures"] == base_config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
