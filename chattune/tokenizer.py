"""Load the tokenizer a model ships, make it usable for span masking, and install the chat template."""

from __future__ import annotations

import os
from typing import Any

from chattune.errors import ConfigError, TemplateError
from chattune.template import TemplateSetup, setup_chat_template

# Qwen(1)'s tiktoken pre-tokenizer pattern (Qwen-7B-Chat's tokenization_qwen.py).
QWEN_TIKTOKEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))


def load_tokenizer(name_or_path: str, *, cache_dir: str | None = None, trust_remote_code: bool = True) -> Any:
    """AutoTokenizer, converted to a fast tokenizer when the model ships a slow one, with a pad token set."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ConfigError(f"cannot load a tokenizer from {name_or_path!r}: {e}") from None
    if not getattr(tok, "is_fast", False):
        tok = _fast_from_tiktoken(tok, name_or_path) or tok
    if tok.pad_token is None:
        # Padding positions are masked from attention and loss, so any existing token will do.
        tok.pad_token = tok.eos_token or tok.unk_token or tok.convert_ids_to_tokens(0)
    return tok


def _fast_from_tiktoken(slow: Any, name_or_path: str) -> Any | None:
    """Qwen-7B-Chat ships `qwen.tiktoken` and a remote-code slow tokenizer with no offset mapping: convert it."""
    vocab_file = os.path.join(name_or_path, "qwen.tiktoken")
    if not os.path.isfile(vocab_file):
        return None
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=vocab_file, pattern=QWEN_TIKTOKEN_PATTERN).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend)
    fast.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS)})
    fast.eos_token = "<|endoftext|>"
    fast.pad_token = "<|endoftext|>"
    fast.chat_template = getattr(slow, "chat_template", None)
    fast.model_max_length = getattr(slow, "model_max_length", 8192)
    return fast


def generation_stop_tokens(name_or_path: str, tokenizer: Any, cache_dir: str | None = None) -> list[str]:
    """The end-of-turn tokens named by the model's generation_config.json (GLM stops on <|user|>, for example)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError):
        return []
    ids = config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return [t for t in tokenizer.convert_ids_to_tokens(ids) if t]


def prepare_tokenizer(name_or_path: str, template: str, *, cache_dir: str | None = None,
                      trust_remote_code: bool = True) -> tuple[Any, TemplateSetup]:
    tok = load_tokenizer(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    try:
        setup = setup_chat_template(tok, template, generation_stop_tokens(name_or_path, tok, cache_dir))
    except TemplateError as e:
        raise TemplateError(f"{name_or_path}: {e}") from None
    return tok, setup
