"""Load the tokenizer a model ships, make it usable for span masking, and install the chat template."""

from __future__ import annotations

import json
import os
from typing import Any

from chattune.data.chat_templates import TemplateSetup, setup_chat_template
from chattune.errors import ConfigError, TemplateError

# Qwen(1)'s tiktoken pre-tokenizer pattern (Qwen-7B-Chat's tokenization_qwen.py).
QWEN_TIKTOKEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))


def load_tokenizer(name_or_path: str, *, cache_dir: str | None = None, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer, converted to a fast tokenizer when the model ships a slow one, with a pad token set."""
    from transformers import AutoTokenizer

    tiktoken_folder = _qwen_tiktoken_folder(name_or_path, cache_dir)
    if tiktoken_folder:
        tok = qwen_tiktoken_tokenizer(tiktoken_folder)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
        except OSError as e:
            raise ConfigError(f"cannot load a tokenizer from {name_or_path!r}: {e}") from None
    if tok.pad_token is None:
        # Padding positions are masked from attention and loss, so any existing token will do.
        tok.pad_token = tok.eos_token or tok.unk_token or tok.convert_ids_to_tokens(0)
    return tok


def _qwen_tiktoken_folder(name_or_path: str, cache_dir: str | None) -> str | None:
    """The folder holding Qwen(1)'s `qwen.tiktoken`: the model directory, or, for a hub id (`Qwen/Qwen-7B-Chat`, the
    README's launch line), its snapshot in the hub cache (fetched when the hub is reachable and the cached config says
    it is a Qwen(1) model)."""
    if os.path.isdir(name_or_path):
        return name_or_path if os.path.isfile(os.path.join(name_or_path, "qwen.tiktoken")) else None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        found = try_to_load_from_cache(name_or_path, "qwen.tiktoken", cache_dir=cache_dir)
        if isinstance(found, str):
            return os.path.dirname(found)
        config = try_to_load_from_cache(name_or_path, "config.json", cache_dir=cache_dir)
        if isinstance(config, str) and json.loads(open(config).read()).get("model_type") == "qwen":
            return os.path.dirname(hf_hub_download(name_or_path, "qwen.tiktoken", cache_dir=cache_dir))
    except Exception:  # not a hub id, offline, or no such file: AutoTokenizer says what is wrong
        return None
    return None


def qwen_tiktoken_tokenizer(folder: str) -> Any:
    """Qwen(1)-7B/14B/72B-Chat: a tiktoken BPE (`qwen.tiktoken`) behind a remote-code slow tokenizer with no offset
    mapping. Build the equivalent fast tokenizer from the BPE file instead (no remote code runs): same ranks, same
    pre-tokenizer pattern, NFC normalization as in Qwen's tokenizer, special tokens at ids 151643+.

    Qwen(1) ships its chat format in code (ChatML with a default system prompt), not as a template, so the built-in
    `qwen` template is installed; --template overrides it.
    """
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from chattune.data.chat_templates import BUILTIN_TEMPLATES

    backend = TikTokenConverter(vocab_file=os.path.join(folder, "qwen.tiktoken"),
                                pattern=QWEN_TIKTOKEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS)})
    fast.eos_token = "<|endoftext|>"
    fast.pad_token = "<|endoftext|>"
    fast.chat_template = BUILTIN_TEMPLATES["qwen"].jinja
    fast.model_max_length = 8192
    fast.name_or_path = folder
    return fast


def generation_stop_tokens(name_or_path: str, tokenizer: Any, cache_dir: str | None = None) -> list[str]:
    """The end-of-turn tokens named by the model's generation_config.json (GLM stops on <|user|>, for example)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError):
        return []
    return [t for t in tokenizer.convert_ids_to_tokens(eos_ids(config.eos_token_id)) if t]


def eos_ids(value: Any) -> list[int]:
    """A generation config's `eos_token_id` (one id, a list, or none) as a list."""
    return [value] if isinstance(value, int) else list(value or [])


def prepare_tokenizer(name_or_path: str, template: str, *, cache_dir: str | None = None,
                      trust_remote_code: bool = False) -> tuple[Any, TemplateSetup]:
    tok = load_tokenizer(name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    try:
        setup = setup_chat_template(tok, template, generation_stop_tokens(name_or_path, tok, cache_dir))
    except TemplateError as e:
        raise TemplateError(f"{name_or_path}: {e}") from None
    return tok, setup
