"""The private part of transformers' chat templating that data preparation relies on, in one place (listed in
chattune.train.hf.SURFACE, which checks the installed version still has it; transformers 5.23.0).

`apply_chat_template(messages[:k], add_generation_prompt=...)` for every trained turn k of a conversation copies the
whole history each time (to plain JSON types, with reasoning fields aliased) before Jinja renders it: the copying is
as costly as the rendering, and the square of the turns. `prefix_renderer` prepares the conversation once, exactly as
apply_chat_template prepares any input (the same functions, applied message by message, so a prefix of the prepared
conversation is the prepared prefix), and renders each prefix with the same compiled template and variables.
A test checks it against apply_chat_template on every published template, and `template.render_conversation` checks
the first conversation of every chunk of data both ways.

The template is the one apply_chat_template compiles, compiled again in the same sandbox (an overlay of its
environment: the same options, filters, globals and extensions) with two shortcuts that change no outcome: the
sandbox's verdict on `loop.first` or `content.startswith` depends only on the object's type and the attribute's name
(but for functions, methods, classes, code, frames and generators), so it is remembered; and `message.content` on a
plain dict is looked up as an item at once, where the sandbox first raised and caught an AttributeError. Measured on
5-10 turn conversations, the two took 10-15% of the whole preparation's CPU. Each render then builds the template's
context as Template.render does, from the template's globals flattened once (Template.render copies them from a
ChainMap of the environment's and the template's at every call): 8% of the CPU of 1-3 turn preparation, 14% of
5-10 turn preparation (`prof` of 10,000 and 2,333 conversations in one process, before and after).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

from jinja2.runtime import new_context
from jinja2.sandbox import ImmutableSandboxedEnvironment

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

# the objects whose attributes' safety the sandbox decides from more than the object's type and the attribute's name
# (jinja2.sandbox.is_internal_attribute); for every other object, is_internal_attribute and modifies_known_mutable
# look only at its type
TYPE_IS_NOT_ENOUGH = (types.FunctionType, types.MethodType, type, types.CodeType, types.TracebackType,
                      types.FrameType, types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)


DICT_ATTRIBUTES = frozenset(dir(dict))  # all a plain dict has: its instances have no attributes of their own
# what apply_chat_template passes to the template beside the special tokens and template kwargs
RENDER_ARGUMENTS = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class RememberingSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with each (type, attribute) safety verdict computed once, and `message.content` on a
    plain dict looked up as the sandbox does when the attribute does not exist (without raising AttributeError
    first)."""

    verdicts: dict[tuple[type, str], bool]

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        key = (type(obj), attr)
        verdict = self.verdicts.get(key)
        if verdict is None:
            verdict = super().is_safe_attribute(obj, attr, value)
            if not isinstance(obj, TYPE_IS_NOT_ENOUGH):
                self.verdicts[key] = verdict
        return verdict


def remembering(compiled: Any, source: str) -> Any:
    """`source` compiled in an overlay of `compiled`'s environment that is a RememberingSandbox; `compiled` itself
    where its environment is not transformers' plain ImmutableSandboxedEnvironment."""
    env = compiled.environment
    if type(env) is not ImmutableSandboxedEnvironment:
        return compiled
    fast = env.overlay()
    fast.__class__ = RememberingSandbox
    fast.verdicts = {}
    return fast.from_string(source)


# by source (the tool-use variant may differ): transformers' compiled template, ours, its globals. Kept for the
# process (a worker prepares chunk after chunk: compiling took ~20 ms of each 1 MB chunk's ~500 ms)
_TEMPLATES: dict[str, tuple[Any, Any, dict]] = {}


def _template(compile_template: Callable[[str], Any], source: str) -> tuple[Any, dict]:
    """`remembering(compile_template(source))` and its globals flattened, made again only when transformers
    compiles the source anew (its own cache is by source)."""
    theirs = compile_template(source)
    known = _TEMPLATES.get(source)
    if known is None or known[0] is not theirs:
        ours = remembering(theirs, source)
        known = _TEMPLATES[source] = theirs, ours, dict(ours.globals)
    return known[1], known[2]


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
        source = tokenizer.get_chat_template(None, schemas)
        compiled, flat = _template(compile_template, source)
        variables = plain({**tokenizer.special_tokens_map, **template_kwargs})  # small: copied for each conversation
        schemas = plain(schemas)
        chat = alias(plain([{k: v for k, v in m.items() if v is not None} for m in messages]))
        env = compiled.environment
        direct = not env.is_async and not RENDER_ARGUMENTS & variables.keys()  # else Template.render (or its error)

        def render(k: int, add_generation_prompt: bool) -> str:
            if k == 0:
                raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
            values = {"messages": chat[:k], "tools": schemas, "documents": None,
                      "add_generation_prompt": add_generation_prompt}
            if not direct:
                return compiled.render(**values, **variables)
            # Template.render's context is dict(globals, **values): with the globals flattened once, not per render
            ctx = new_context(env, compiled.name, compiled.blocks, {**flat, **values, **variables}, True, flat)
            try:
                return env.concat(compiled.root_render_func(ctx))
            except Exception:  # noqa: BLE001 - as Template.render: the template's own error, its line rewritten
                env.handle_exception()

        return render

    return bind
