"""Qwen finetune.py's flags keep their names, defaults and meaning; unknown flags are errors."""

import pytest

from chattune.errors import ConfigError
from chattune.train.args import parse_args

QWEN_LORA_LINE = (
    "--model_name_or_path Qwen/Qwen-7B-Chat --data_path data.json --bf16 False --output_dir output_qwen "
    "--num_train_epochs 5 --per_device_train_batch_size 2 --per_device_eval_batch_size 1 "
    "--gradient_accumulation_steps 8 --evaluation_strategy no --save_strategy steps --save_steps 1000 "
    "--save_total_limit 10 --learning_rate 3e-4 --weight_decay 0.1 --adam_beta2 0.95 --warmup_ratio 0.01 "
    "--lr_scheduler_type cosine --logging_steps 1 --report_to none --model_max_length 512 --lazy_preprocess True "
    "--use_lora --q_lora --gradient_checkpointing --use_cpu True"
).split()


def test_qwen_launch_line_parses_with_qwen_meaning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.json").write_text("[]")
    model, data, training, lora = parse_args(QWEN_LORA_LINE)
    assert model.model_name_or_path == "Qwen/Qwen-7B-Chat" and data.data_path == "data.json"
    assert data.lazy_preprocess is True and training.use_lora is True and lora.q_lora is True
    assert training.eval_strategy == "no"  # --evaluation_strategy, renamed by transformers, is accepted
    assert training.model_max_length == 512 and training.gradient_checkpointing is True
    assert training.gradient_accumulation_steps == 8 and training.learning_rate == 3e-4
    assert training.warmup_steps == 0.01  # --warmup_ratio, removed by transformers 5: a float < 1 is a ratio


def test_qwen_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text("[]")
    model, data, training, lora = parse_args(["--output_dir", "o", "--use_cpu", "True", "--data_path",
                                              str(tmp_path / "d.json")])
    assert model.model_name_or_path == "Qwen/Qwen-7B"
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lora_bias, lora.lora_weight_path) == (
        64, 16, 0.05, "none", "")
    assert training.model_max_length == 8192 and training.optim == "adamw_torch" and training.use_lora is False
    assert data.eval_data_path is None and data.lazy_preprocess is False and lora.q_lora is False
    assert training.cache_dir is None


def test_unknown_and_inconsistent_flags_are_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="unknown arguments: --lora_rank 8"):
        parse_args(["--output_dir", "o", "--lora_rank", "8"])
    with pytest.raises(ConfigError):  # TrainingArguments' own validation, reported without a traceback
        parse_args(["--output_dir", "o", "--use_cpu", "True", "--bf16", "True", "--fp16", "True"])


def test_enumerated_flags_fail_first_all_at_once_with_their_choices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    """Bad values of enumerated flags and inconsistent flags are one error, before any data or weights are read."""
    argv = ["--output_dir", "o", "--use_cpu", "True", "--data_path", str(tmp_path / "missing.json"),
            "--fused_ce", "bogus", "--packing", "maybe", "--lora_bias", "weird", "--attn_implementation", "flashy",
            "--q_lora"]
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    message = str(e.value)
    assert message.startswith("6 problems with the arguments:")
    assert "--fused_ce 'bogus': choose one of auto, liger, chunked, none" in message
    assert "--packing 'maybe': choose one of auto, true, false" in message
    assert "--lora_bias 'weird': choose one of none, all, lora_only" in message
    assert "--attn_implementation 'flashy': choose one of auto, sdpa, eager" in message
    assert f"--data_path {tmp_path / 'missing.json'}: does not exist" in message
    assert "--q_lora trains a LoRA adapter on a 4-bit base: add --use_lora" in message


def test_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--fused_ce {auto,liger,chunked,none}" in out and "--packing {auto,true,false}" in out
    assert "--template {auto,chatml,qwen,deepseek,llama3,llama2}" in out


def test_boolean_spellings_of_tristate_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text("[]")
    base = ["--output_dir", "o", "--use_cpu", "True", "--data_path", str(tmp_path / "d.json")]
    assert parse_args([*base, "--packing", "True"])[2].packing == "true"
    assert parse_args([*base, "--packing=0"])[2].packing == "false"


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_config_file_takes_renamed_flags_and_command_line_overrides(tmp_path, suffix, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import json

    (tmp_path / "d.json").write_text("[]")
    values = {"data_path": str(tmp_path / "d.json"), "output_dir": "o", "use_cpu": True, "warmup_ratio": 0.03,
              "evaluation_strategy": "no", "learning_rate": 3e-4, "lora_target_modules": ["q_proj", "v_proj"],
              "use_lora": True}
    path = tmp_path / f"run.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    _, data, training, lora = parse_args([str(path), "--learning_rate", "1e-4"])
    assert training.warmup_steps == 0.03 and training.learning_rate == 1e-4 and training.use_lora
    assert lora.lora_target_modules == ["q_proj", "v_proj"] and data.data_path == str(tmp_path / "d.json")
    path.write_text(json.dumps({**values, "lora_rnak": 8}))
    with pytest.raises(ConfigError, match="unknown key\\(s\\) lora_rnak"):
        parse_args([str(path)])


def test_output_dir_that_cannot_be_written_is_an_error_before_any_work(tmp_path, monkeypatch):
    import errno
    import tempfile

    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "a_file").write_text("")
    base = ["--use_cpu", "True", "--data_path", str(tmp_path / "d.json")]
    with pytest.raises(ConfigError, match="a_file: is a file, not a directory"):
        parse_args([*base, "--output_dir", str(tmp_path / "a_file")])
    assert parse_args([*base, "--output_dir", str(tmp_path / "new" / "run")])[2].output_dir.endswith("new/run")
    assert (tmp_path / "new" / "run").is_dir()

    def read_only(*args, **kwargs):  # what a read-only directory answers (the tests run as root, who writes anywhere)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(ConfigError, match="run: cannot be written \\(Permission denied\\); choose a directory"):
        parse_args([*base, "--output_dir", str(tmp_path / "new" / "run")])


@pytest.mark.parametrize("flags, named", [
    (["--learning_rate", "-1"], "--learning_rate -1: give a positive rate"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: give 1 or more"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: give 1 or more"),
    (["--seed", "-1"], "--seed -1: give a whole number from 0 to 4294967295"),
    (["--num_train_epochs", "0"], "--num_train_epochs 0: nothing would be trained"),
    (["--use_lora", "--lora_alpha", "0"], "--lora_alpha 0: give a positive scale"),
    (["--save_steps", "-5"], "--save_steps -5: give steps"),
])
def test_numbers_out_of_range_are_one_line_before_any_work(tmp_path, monkeypatch, flags, named):
    """Each would otherwise be a traceback from torch, numpy or the planner, or (0 epochs) a run that saves the base
    model as its result and exits 0."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text("[]")
    with pytest.raises(ConfigError) as e:
        parse_args(["--output_dir", "o", "--use_cpu", "True", "--data_path", str(tmp_path / "d.json"), *flags])
    assert str(e.value).startswith(named), str(e.value)


def test_zero_epochs_is_fine_when_max_steps_gives_the_length(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text("[]")
    _, _, training, _ = parse_args(["--output_dir", "o", "--use_cpu", "True", "--data_path", str(tmp_path / "d.json"),
                                    "--num_train_epochs", "0", "--max_steps", "10"])
    assert training.max_steps == 10


def test_yaml_no_and_off_mean_the_words_for_enumerated_flags(tmp_path, monkeypatch):
    """YAML 1.1 reads `evaluation_strategy: no` as the boolean False; the flag means the word "no"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text("[]")
    path = tmp_path / "run.yaml"
    path.write_text(f"data_path: {tmp_path / 'd.json'}\noutput_dir: o\nuse_cpu: yes\nevaluation_strategy: no\n"
                    "save_strategy: no\npacking: off\ngradient_checkpointing: on\n")
    _, _, training, _ = parse_args([str(path)])
    assert str(getattr(training.eval_strategy, "value", training.eval_strategy)) == "no"
    assert str(getattr(training.save_strategy, "value", training.save_strategy)) == "no"
    assert training.packing == "false" and training.gradient_checkpointing is True and training.use_cpu is True


def test_a_save_steps_ratio_is_a_share_of_the_run_in_the_plan_and_the_disk_warning(tmp_path, monkeypatch):
    """--save_steps 0.1 of a 1,000-step run is 10 checkpoints (transformers' reading), not 10,000."""
    from chattune.train.memory import ModelShape, disk_warning
    from chattune.train.plan import plan_schedule

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text("[]")
    _, _, training, lora = parse_args(["--output_dir", "o", "--use_cpu", "True", "--data_path",
                                       str(tmp_path / "d.json"), "--save_steps", "0.1"])
    assert plan_schedule(training, has_eval=False).saves == "every 10% of the run"
    shape = ModelShape(linear_params=10**6, embedding_params=10**5, other_params=10**3, hidden_size=64,
                       intermediate_size=128, num_layers=2, vocab_size=1000, lora_params_per_rank=1000)
    warning = disk_warning(training, lora, "full", shape, steps=1000, free=1)
    assert warning is not None and " 10 checkpoints of" in warning, warning


def test_a_deepspeed_config_that_is_broken_or_contradicts_the_flags_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text("[]")
    base = ["--output_dir", "o", "--use_cpu", "True", "--data_path", str(tmp_path / "d.json")]
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match="--deepspeed bad.json: not valid JSON \\(Expecting property name enclosed "
                                          "in double quotes at line 1, column 35\\)"):
        parse_args([*base, "--deepspeed", "bad.json"])
    with pytest.raises(ConfigError, match="--deepspeed missing.json: no such file"):
        parse_args([*base, "--deepspeed", "missing.json"])
    (tmp_path / "both.json").write_text('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": true}, '
                                        '"fp16": {"enabled": true}, "train_micro_batch_size_per_gpu": 8}')
    with pytest.raises(ConfigError) as e:
        parse_args([*base, "--deepspeed", "both.json", "--per_device_train_batch_size", "2"])
    assert "--deepspeed both.json: enables both bf16 and fp16" in str(e.value)
    assert ("--deepspeed both.json: train_micro_batch_size_per_gpu is 8, --per_device_train_batch_size is 2: set it "
            'to "auto"') in str(e.value)


def test_an_hf_cache_that_cannot_be_created_is_named_before_anything_loads(tmp_path, monkeypatch):
    """A real one: HF_HOME under a regular file (ENOTDIR, as a typo or a read-only filesystem gives). Unnamed, GPTQModel's
    tokenicer, imported by peft while it wraps the layers, failed with a traceback after the data was prepared."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "a_file" / "hf"))
    with pytest.raises(ConfigError, match=f"HF_HOME {tmp_path / 'a_file' / 'hf'}: cannot be created \\(Not a "
                                          "directory\\); the Hugging Face libraries write there"):
        parse_args(["--output_dir", "o", "--use_cpu", "True", "--data_path", str(tmp_path / "d.json")])


@pytest.mark.parametrize("flags, cuda, chosen", [
    ([], True, "adamw_torch_fused"),  # fused AdamW by default on CUDA
    ([], False, "adamw_torch"),
    (["--deepspeed", "ds_configs/zero3_offload.json"], True, "adamw_torch"),  # DeepSpeed steps it on the CPU
    (["--optim", "adamw_torch"], True, "adamw_torch"),  # the user's flag wins
    (["--optim", "adafactor"], False, "adafactor"),
])
def test_the_plan_picks_the_optimizer_and_the_trainer_gets_it(flags, cuda, chosen, tmp_path):
    from chattune.train.architecture import ModelClass
    from chattune.train.plan import Hardware, OutputDir, make_plan, trainer_arguments

    model, data, training, lora = parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path),
                                              "--data_path", "examples/sharegpt.json", *flags])
    plan = make_plan(model, data, training, lora, ModelClass("Qwen2ForCausalLM", False, proven=True), [300, 120],
                     Hardware(cuda=cuda), OutputDir(str(tmp_path)), has_eval=False)
    assert plan.optimizer.choice == chosen and plan.to_dict()["optimizer"] == chosen
    assert str(getattr(trainer_arguments(plan, training).optim, "value", None)) == chosen
    assert f"optimizer  {chosen}: " in plan.format()


def test_the_plan_recomputes_only_what_the_gpu_needs_and_a_given_flag_wins(tmp_path):
    """Qwen2.5-1.5B full fine-tuning on 8k-token micro-batches (fp32: CPU parses refuse --bf16): on an 80 GB card
    no recompute, on smaller ones some layers, then all, then all with their inputs in host memory. Each choice is
    the least recompute whose estimate fits 90% of the card: the one before it does not."""
    from dataclasses import replace

    import transformers

    from chattune.train.architecture import ModelClass
    from chattune.train.decisions import Recompute
    from chattune.train.memory import GB, estimate, shape_from_config
    from chattune.train.plan import Hardware, OutputDir, make_plan, trainer_arguments

    config = transformers.Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                      num_attention_heads=12, num_key_value_heads=2, vocab_size=151936)
    shape = shape_from_config(config)

    def plan(gb, *flags):
        args = parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--data_path",
                           "examples/sharegpt.json", "--max_tokens_per_batch", "8192", *flags])
        return make_plan(*args, ModelClass("Qwen2ForCausalLM", False, proven=True, flash=True), [8000] * 64,
                         Hardware(cuda=True, gpu_memory_gb=gb, flash_problem=None), OutputDir(str(tmp_path)),
                         has_eval=False, shape=shape), args

    from chattune.train.memory import run_setup

    chosen = {}
    for gb in (80, 64, 56, 48, 40, 24):
        p, (_, _, training, lora) = plan(gb)
        chosen[gb] = (p.recompute.every, p.recompute.offload)
        setup = replace(p.recompute.setup(run_setup(training, lora, "full", 1)),
                        micro_batch_tokens=p.batch.peak_micro_batch_tokens)
        assert p.memory_gb == round(estimate(shape, setup)["total"] / GB, 1)
        less = [Recompute(None, e, o) for e, o in ((0, False), (4, False), (3, False), (2, False), (1, False),
                                                    (1, True))]
        rank = [(r.every, r.offload) for r in less].index(chosen[gb])
        if rank:  # what it recomputes, it must: the choice before it does not fit
            before = less[rank - 1].setup(setup)
            assert estimate(shape, before)["total"] / GB > 0.9 * gb
        if gb == 80:
            assert chosen[gb] == (0, False) and p.to_dict()["gradient_checkpointing"] == "off"
        arguments = trainer_arguments(p, training)
        assert bool(arguments.activation_checkpointing) == (p.recompute.every > 0)
        if p.recompute.every:
            assert arguments.activation_checkpointing_kwargs["every_n_layers"] == p.recompute.every
    order = [(0, False), (4, False), (3, False), (2, False), (1, False), (1, True)]
    ranks = [order.index(chosen[gb]) for gb in (80, 64, 56, 48, 40, 24)]
    assert ranks == sorted(ranks) and ranks[0] == 0 and ranks[-1] == len(order) - 1  # less memory, more recompute
    assert any(0 < r < 4 for r in ranks)  # some card recomputes only some layers (fp32 here: 56 GB, every 4th)
    given, _ = plan(80, "--gradient_checkpointing", "True")
    assert given.recompute.every == 1 and given.recompute.decision.why == "--gradient_checkpointing True"
    cpu = make_plan(*parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--data_path",
                                 "examples/sharegpt.json"]), ModelClass("Qwen2ForCausalLM", False, proven=True),
                    [300], Hardware(), OutputDir(str(tmp_path)), has_eval=False)
    assert cpu.recompute.every == 0 and "no CUDA GPU" in cpu.recompute.decision.why


def test_torch_varlen_plans_packed_rows_that_carry_their_sample_boundaries(tmp_path):
    from chattune.train.architecture import ModelClass
    from chattune.train.plan import Hardware, OutputDir, make_plan

    def plan(*flags, **hardware):
        args = parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--data_path",
                           "examples/sharegpt.json", *flags])
        return make_plan(*args, ModelClass("Qwen2ForCausalLM", False, proven=True, flash=True, flex=True),
                         [300, 120], Hardware(cuda=True, **hardware), OutputDir(str(tmp_path)), has_eval=False)

    varlen = plan("--attn_implementation", "torch_varlen", varlen_problem=None)
    assert (varlen.attention.choice, varlen.batch.shape.packed, varlen.sample_boundaries) == ("torch_varlen", True, True)
    assert varlen.attention.why == "--attn_implementation torch_varlen"
    flex = plan(varlen_problem=None)  # auto keeps flex_attention, which finds the boundaries from position_ids
    assert (flex.attention.choice, flex.sample_boundaries) == ("flex_attention", False)
    with pytest.raises(ConfigError, match="torch_varlen: torch 2.9 has no torch.nn.attention.varlen"):
        plan("--attn_implementation", "torch_varlen",
             varlen_problem="torch 2.9 has no torch.nn.attention.varlen (torch 2.10 or newer has)")
