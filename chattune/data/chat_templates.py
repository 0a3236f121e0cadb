"""Which chat template a run uses: the tokenizer's own, or a built-in one for tokenizers that ship none (base
models, Qwen-7B-Chat's tiktoken tokenizer); its end-of-turn tokens; and the run's template variables baked in."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chattune.errors import TemplateError


@dataclass(frozen=True)
class BuiltinTemplate:
    jinja: str
    special_tokens: tuple[str, ...] = ()  # added to the tokenizer when missing (new embeddings!)
    stop_tokens: tuple[str, ...] = ()  # end-of-turn tokens generation must stop on ("" = the tokenizer's eos)
    note: str = ""


# ChatML with Qwen's tool-calling format: the tool schemas in the system turn (<tools>), calls as
# <tool_call>{"name", "arguments"}</tool_call> in the assistant turn, results as <tool_response> in a user turn
# (consecutive results share one). Without tools it is plain ChatML. Every line is a whitespace-trimming tag, so the
# layout here adds nothing to the rendered text; DEFAULT_SYSTEM is replaced per template.
_CHATML = r"""
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\n\n' -}}
    {%- elif DEFAULT_SYSTEM -%}{{- DEFAULT_SYSTEM + '\n\n' -}}{%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' -}}
    {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": ' -}}
    {{- '<args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif messages[0]['role'] != 'system' and DEFAULT_SYSTEM -%}
    {{- '<|im_start|>system\n' + DEFAULT_SYSTEM + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if not tools -%}{{- '<|im_start|>system\n' + message['content'] + '<|im_end|>\n' -}}{%- endif -%}
    {%- elif message['role'] == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
        {{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' -}}
        {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
    {%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}
        {{- '<|im_start|>assistant' -}}
        {%- if message['content'] -%}{{- '\n' + message['content'] -}}{%- endif -%}
        {%- for call in message['tool_calls'] -%}
            {{- '\n<tool_call>\n{"name": "' + call['function']['name'] + '", "arguments": ' -}}
            {{- (call['function']['arguments'] | tojson) + '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- else -%}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""


def _chatml(default_system: str = "") -> str:
    jinja = "".join(line.strip() for line in _CHATML.strip().splitlines())
    return jinja.replace("DEFAULT_SYSTEM", repr(default_system))


BUILTIN_TEMPLATES: dict[str, BuiltinTemplate] = {
    "chatml": BuiltinTemplate(
        jinja=_chatml(),
        special_tokens=("<|im_start|>", "<|im_end|>"),
        stop_tokens=("<|im_end|>",),
        note="ChatML with Qwen's tool-calling format, no default system prompt",
    ),
    "qwen": BuiltinTemplate(
        jinja=_chatml("You are a helpful assistant."),
        special_tokens=("<|im_start|>", "<|im_end|>"),
        stop_tokens=("<|im_end|>",),
        note="ChatML with Qwen's default system prompt and tool-calling format (Qwen-7B-Chat, Qwen1.5/2/2.5)",
    ),
    "deepseek": BuiltinTemplate(
        jinja="{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\\n\\n' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' + message['content'] + eos_token -}}"
        "{%- else -%}{{- message['content'] + '\\n\\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}",
        stop_tokens=("",),
        note="DeepSeek-LLM / DeepSeek-Coder-V2 chat",
    ),
    "llama3": BuiltinTemplate(
        jinja="{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        stop_tokens=("<|eot_id|>",),
        note="Llama 3 / 3.1 instruct",
    ),
    "llama2": BuiltinTemplate(
        jinja="{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}"
        "{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- bos_token + '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + message['content'] + ' ' + eos_token -}}{%- endif -%}"
        "{%- endfor -%}",
        stop_tokens=("",),
        note="Llama 2 chat",
    ),
}


def template_choices() -> str:
    return ", ".join(["auto", *BUILTIN_TEMPLATES])


@dataclass(frozen=True)
class TemplateSetup:
    name: str  # "auto" (the tokenizer's own) or a built-in name
    added_tokens: tuple[str, ...]  # special tokens that were new to the tokenizer
    stop_tokens: tuple[str, ...]  # end-of-turn strings, primary first (appended where a template leaves a turn open)


def setup_chat_template(tokenizer: Any, name: str = "auto", extra_stop_tokens: Sequence[str] = ()) -> TemplateSetup:
    """Install the chat template on `tokenizer` (in place) and return what changed.

    `auto` keeps the tokenizer's own `chat_template` and fails when it has none. A built-in name replaces it and adds
    the template's special tokens when the vocabulary lacks them (the caller must then resize the embeddings).
    `extra_stop_tokens` are further end-of-turn strings, typically the model's `generation_config.eos_token_id`.
    """
    added: list[str] = []
    stops: list[str] = []
    if name == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "the tokenizer has no chat template (tokenizer_config.json has no `chat_template`, and there is no "
                f"chat_template.jinja); pass --template with one of: {', '.join(BUILTIN_TEMPLATES)}"
            )
        # A tokenizer carrying one of our built-in templates (a chattune output, Qwen(1)) keeps its stop tokens.
        known = next((b for b in BUILTIN_TEMPLATES.values() if b.jinja == tokenizer.chat_template), None)
        if known is not None:
            stops.extend(t for t in known.stop_tokens if t)
    elif name in BUILTIN_TEMPLATES:
        builtin = BUILTIN_TEMPLATES[name]
        vocab = tokenizer.get_vocab()
        missing = [t for t in builtin.special_tokens if t not in vocab]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
            added.extend(missing)
        tokenizer.chat_template = builtin.jinja
        stops.extend(t for t in builtin.stop_tokens if t)
    else:
        raise TemplateError(f"unknown --template {name!r}; choose one of: {template_choices()}")
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    stops.extend(extra_stop_tokens)
    if not stops:
        raise TemplateError(
            "the tokenizer has no eos_token and the template names no end-of-turn token, so the model could not learn "
            "to stop; set eos_token in tokenizer_config.json or pass a built-in --template"
        )
    return TemplateSetup(name=name, added_tokens=tuple(added), stop_tokens=tuple(dict.fromkeys(stops)))


BAKED_MARK = "{#- chattune: the training run's template variables #}"


BAKED_END = "{#- chattune: end #}"


def bake_template_kwargs(chat_template: Any, template_kwargs: dict[str, Any] | None) -> Any:
    """The chat template with the training's extra variables (--template_kwargs, e.g. enable_thinking false) as its
    defaults, so that an engine rendering the saved template without them (vLLM, llama.cpp, TGI) renders the prompt
    training used; a caller that passes a variable still decides it. Rendering with the same variables gives the
    same text. Baking again replaces the earlier defaults."""
    if not template_kwargs or not isinstance(chat_template, str):
        return chat_template
    if chat_template.startswith(BAKED_MARK) and BAKED_END in chat_template:
        chat_template = chat_template.split(BAKED_END, 1)[1]
    sets = []
    for name, value in template_kwargs.items():
        if not name.isidentifier():
            raise TemplateError(f"--template_kwargs: {name!r} is not a template variable name")
        sets.append("{%- if " + name + " is not defined %}{%- set " + name + " = " + _jinja_literal(value)
                    + " %}{%- endif %}")
    return BAKED_MARK + "".join(sets) + BAKED_END + chat_template  # adds no text, strips none of the template's


def _jinja_literal(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_jinja_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_jinja_literal(v)}" for k, v in value.items()) + "}"
    raise TemplateError(f"--template_kwargs: {value!r} is not a JSON value")
