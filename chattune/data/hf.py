"""The private part of transformers' chat templating that data preparation relies on, in one place (listed in
chattune.train.hf.SURFACE, which checks the installed version still has it; transformers 5.23.0).

`apply_chat_template(messages[:k], add_generation_prompt=...)` for every trained turn k of a conversation copies the
whole history each time (to plain JSON types, with reasoning fields aliased) before Jinja renders it: the copying is
as costly as the rendering, and the square of the turns. `prefix_renderer` prepares the conversation once, exactly as
apply_chat_template prepares any input (the same functions, applied message by message, so a prefix of the prepared
conversation is the prepared prefix), and renders each prefix with the same compiled template and variables.
A test checks it against apply_chat_template on every published template, and `template.render_conversation` checks
the first conversation of every chunk of data both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# (object path, parameters relied on, why): merged into chattune.train.hf.SURFACE
SURFACE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("transformers.utils.chat_template_utils._compile_jinja_template", ("chat_template",),
     "the template compiled as apply_chat_template compiles it (its sandbox, filters and globals; cached)"),
    ("transformers.utils.chat_template_utils._plain_template_data", ("value",),
     "messages, tools and variables rebuilt from plain JSON types, as render_jinja_template does"),
    ("transformers.utils.chat_template_utils._alias_reasoning_fields", ("chat",),
     "reasoning_content / thinking filled from each other, as render_jinja_template does"),
)

PrefixRender = Callable[[int, bool], str]  # (number of messages, add_generation_prompt) -> text


def prefix_renderer(tokenizer: Any, template_kwargs: dict[str, Any]) -> Callable[..., PrefixRender] | None:
    """`bind(messages, tools)` -> `render(k, add_generation_prompt)` equal to `tokenizer.apply_chat_template(
    messages[:k], tools=tools or None, add_generation_prompt=..., tokenize=False, **template_kwargs)`; None where this
    transformers lacks what it needs."""
    try:
        from transformers.utils import chat_template_utils as templating

        compile_template = templating._compile_jinja_template
        plain = templating._plain_template_data
        alias = templating._alias_reasoning_fields
    except (ImportError, AttributeError):
        return None

    def bind(messages: Sequence[dict], tools: Sequence[dict] = ()) -> PrefixRender:
        schemas = list(tools) if tools else None
        compiled = compile_template(tokenizer.get_chat_template(None, schemas))
        variables = plain({**tokenizer.special_tokens_map, **template_kwargs})
        schemas = plain(schemas)
        chat = alias(plain([{k: v for k, v in m.items() if v is not None} for m in messages]))

        def render(k: int, add_generation_prompt: bool) -> str:
            if k == 0:
                raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
            return compiled.render(messages=chat[:k], tools=schemas, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)

        return render

    return bind
