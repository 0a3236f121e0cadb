"""Qwen finetune.py's flags keep their names, defaults and meaning; unknown flags are errors."""

import pytest

from chattune.args import parse_args
from chattune.errors import ConfigError

QWEN_LORA_LINE = (
    "--model_name_or_path Qwen/Qwen-7B-Chat --data_path data.json --bf16 False --output_dir output_qwen "
    "--num_train_epochs 5 --per_device_train_batch_size 2 --per_device_eval_batch_size 1 "
    "--gradient_accumulation_steps 8 --evaluation_strategy no --save_strategy steps --save_steps 1000 "
    "--save_total_limit 10 --learning_rate 3e-4 --weight_decay 0.1 --adam_beta2 0.95 --warmup_ratio 0.01 "
    "--lr_scheduler_type cosine --logging_steps 1 --report_to none --model_max_length 512 --lazy_preprocess True "
    "--use_lora --q_lora --gradient_checkpointing --use_cpu True"
).split()


def test_qwen_launch_line_parses_with_qwen_meaning():
    model, data, training, lora = parse_args(QWEN_LORA_LINE)
    assert model.model_name_or_path == "Qwen/Qwen-7B-Chat" and data.data_path == "data.json"
    assert data.lazy_preprocess is True and training.use_lora is True and lora.q_lora is True
    assert training.eval_strategy == "no"  # --evaluation_strategy, renamed by transformers, is accepted
    assert training.model_max_length == 512 and training.gradient_checkpointing is True
    assert training.gradient_accumulation_steps == 8 and training.learning_rate == 3e-4
    assert training.warmup_steps == 0.01  # --warmup_ratio, removed by transformers 5: a float < 1 is a ratio


def test_qwen_defaults():
    model, data, training, lora = parse_args(["--output_dir", "o", "--use_cpu", "True"])
    assert model.model_name_or_path == "Qwen/Qwen-7B"
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lora_bias, lora.lora_weight_path) == (
        64, 16, 0.05, "none", "")
    assert training.model_max_length == 8192 and training.optim == "adamw_torch" and training.use_lora is False
    assert data.eval_data_path is None and data.lazy_preprocess is False and lora.q_lora is False
    assert training.cache_dir is None


def test_unknown_and_inconsistent_flags_are_errors():
    with pytest.raises(ConfigError, match="unknown arguments: --lora_rank 8"):
        parse_args(["--output_dir", "o", "--lora_rank", "8"])
    with pytest.raises(ConfigError):  # TrainingArguments' own validation, reported without a traceback
        parse_args(["--output_dir", "o", "--use_cpu", "True", "--bf16", "True", "--fp16", "True"])
