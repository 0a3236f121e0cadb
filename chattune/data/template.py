"""Render conversations with the model's own chat template and mask the loss from character spans.

Contract (what `render_conversation` + `encode_samples` guarantee):

* The text of a sample is exactly `tokenizer.apply_chat_template(messages, tools=..., tokenize=False)`.
* The trained part of assistant turn *i* starts where `apply_chat_template(messages[:i], add_generation_prompt=True)`
  ends, i.e. it is precisely what the model has to generate at inference after that prompt, and it runs through the
  turn's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, eos, ...). Whitespace the template writes *after* the
  end-of-turn token is not trained: at inference the model stops before it.
* Token-exact: the ids before a trained turn's first trained token are exactly `apply_chat_template(messages[:i],
  add_generation_prompt=True, tokenize=True)`, and the answer is tokenized as its own continuation (a BPE merge across
  the prompt/answer boundary, e.g. `<think>\n` + `\n`, never yields a prompt inference does not produce). A turn
  whose exact prompt differs from the tokens of the sample before it is trained in a sample of its own.
* Templates that rewrite earlier turns (Qwen3 drops the reasoning of earlier answers) are not prefix stable: a turn
  whose rendering is not a prefix of the whole conversation is emitted as its own sample, ending at that turn, so
  every trained turn sees exactly the history it sees at inference.
* Tool calls and tool results are rendered by the template (`tools=`); tool results are never trained, the
  assistant turns that call tools are.
* Work is bounded by the length limit: once a trained turn's exact prompt alone fills `max_length` tokens, that turn
  and the later ones cannot train a kept token, and where every prompt up to there is a prefix of the whole text they
  are not rendered at all (`PromptLimit`; counted as `beyond_limit_turns`). A 10,000-turn record costs what its first
  `max_length` tokens cost, not a render of every turn's history.
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chattune.data.chat_templates import BUILTIN_TEMPLATES
from chattune.data.hf import PrefixRender, prefix_renderer
from chattune.errors import TemplateError

Messages = Sequence[dict[str, Any]]
Renderer = Callable[..., str]  # (messages, add_generation_prompt, tools=()) -> text


# --------------------------------------------------------------------------------------------------------------
# Built-in templates, for tokenizers that ship none (base models, Qwen-7B-Chat's tiktoken tokenizer).
# --------------------------------------------------------------------------------------------------------------


def make_renderer(tokenizer: Any, template_kwargs: dict[str, Any] | None = None) -> Renderer:
    """The inference-time rendering function: `apply_chat_template` with the given extra template variables, and the
    record's tool schemas (`tools=`) when it has any."""
    kwargs = dict(template_kwargs or {})

    def render(messages: Messages, add_generation_prompt: bool, tools: Sequence[dict] = ()) -> str:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
            tools=list(tools) if tools else None, **kwargs,
        )

    render.template_kwargs = kwargs
    render.prefixes = prefix_renderer(tokenizer, kwargs)
    return render


# --------------------------------------------------------------------------------------------------------------
# Rendering and character spans
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RenderedSample:
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) character ranges that are trained
    own_turn: bool = False  # rendered on its own because the template rewrites this turn in later history
    eos_appended: bool = False  # the template closes the last turn with nothing; the eos token was appended
    unstopped_turns: int = 0  # trained turns not followed by any end-of-turn token (warned about in the report)
    trained_turns: int = 0  # assistant turns trained in this sample
    masked_turns: int = 0  # assistant turns the data (or --train_on last) marks as not trained
    unrendered_reasoning: int = 0  # trained turns whose reasoning_content the template does not render
    beyond_limit_turns: int = 0  # trained turns whose prompt alone fills max_length: not rendered, not trained
    plain: list[tuple[int, int]] = field(default_factory=list)  # control-token strings of content: encoded as text


def trained_turn_indices(messages: Messages, masked: Sequence[int] = (), train_on: str = "all") -> list[int]:
    """Assistant messages to train: all of them (or the last one, --train_on last) except those marked untrained."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    chosen = assistant[-1:] if train_on == "last" else assistant
    return [i for i in chosen if i not in set(masked)]


class PromptLimit:
    """Whether a prompt alone fills the length limit, so the turn after it cannot train a kept token.

    The ids before a trained turn's first trained token are exactly `tokenize(prompt)` (the token-exact contract,
    whichever sample the turn lands in), so a turn whose prompt tokenizes to `max_length` ids or more trains nothing.
    The count is estimated from one tokenization of the whole conversation (the tokens that end within the prompt)
    and confirmed by tokenizing the prompt itself, once the estimate reaches the limit; or counted exactly by
    `counter` (`splits.SplitEncoder.count`, which tokenizes each split of the conversation once). Prompts of fewer
    bytes than the limit cannot fill it, and cost nothing.
    """

    def __init__(self, tokenizer: Any, max_length: int, counter: Callable[[str], int] | None = None) -> None:
        self.tokenizer, self.max_length, self.counter = tokenizer, max_length, counter

    def bind(self, text: str) -> Callable[[str], bool] | None:
        """The test for prompts of the conversation rendered as `text`; None when the whole text cannot fill the
        limit (no token stands for less than one byte; one more for a tokenizer's leading-space marker)."""
        if len(text.encode("utf-8")) + 1 < self.max_length:
            return None
        ends: list[int] = []

        def fills(prompt: str) -> bool:
            if 4 * len(prompt) + 1 < self.max_length or len(prompt.encode("utf-8")) + 1 < self.max_length:
                return False  # too few bytes to fill the limit (no token is less than a byte; UTF-8: 1-4 per char)
            if self.counter is not None:
                return self.counter(prompt) >= self.max_length
            if not ends:
                offsets = self.tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                                         return_offsets_mapping=True)["offset_mapping"]
                ends.extend(sorted(end for _, end in offsets))
            if bisect.bisect_right(ends, len(prompt)) < self.max_length:
                return False
            ids = self.tokenizer(prompt, add_special_tokens=False, return_attention_mask=False)["input_ids"]
            return len(ids) >= self.max_length

        return fills


def render_conversation(render: Renderer, messages: Messages, stop_tokens: Sequence[str], *,
                        tools: Sequence[dict] = (), masked: Sequence[int] = (), train_on: str = "all",
                        source: str = "", plain_tokens: Sequence[str] = (),
                        limit: PromptLimit | None = None, check: bool = False) -> list[RenderedSample]:
    """Render one validated conversation into one or more samples with trained character spans.

    The first sample is the whole conversation. A turn the template renders differently once the conversation goes on
    (Qwen3 and Qwen3.5 drop the reasoning of answers before the last user query) is trained in a sample that ends
    where its user query's span ends: the conversation cut before the next user message, shared by every turn of
    that span that renders in it as in its own prefix (an agent's tool steps and its answer: one sample per user
    query, not one per step). A turn that does not gets a sample of its own. Tool schemas are rendered by the
    template (`tools=`).

    With `limit`, the first trained turn whose prompt alone fills the limit ends the rendering when every prompt so
    far is a prefix of the whole conversation's text followed by the generation prompt (the template renders a
    history the same whatever follows it; a turn itself may still render differently as the last one, as Qwen3's
    do): later prompts extend that history, so no later turn can train a kept token either. They are counted in
    `beyond_limit_turns` of the first sample instead of being rendered (the quadratic part: every turn's history).

    Histories are rendered by `render.prefixes` where the renderer has it (chattune.data.hf: the conversation
    prepared once, not for every turn); `check` renders them by apply_chat_template too and turns that off for this
    renderer, with a note, at the first difference (the first conversation of every chunk is checked).
    """
    prefix = _prefixes(render, messages, tools, check)
    full = RenderedSample(prefix(len(messages), False))
    where = f"{source}: " if source else ""
    _check_tools_rendered(full.text, tools, where)
    trained = trained_turn_indices(messages, masked, train_on)
    full.masked_turns = sum(m["role"] == "assistant" for m in messages) - len(trained)
    own: list[RenderedSample] = []
    spans: dict[int, RenderedSample] = {}  # samples of the conversation cut before a user message, by that index
    fills = None
    if limit is not None and not (plain_tokens and content_control_tokens(messages, plain_tokens)):
        fills = limit.bind(full.text)  # control tokens kept as text tokenize otherwise: no bound for those records
    generation: str | None = None  # the text add_generation_prompt appends, learned at the first trained turn
    for n, i in enumerate(trained):
        prompt = prefix(i, True)
        if fills is not None:
            if generation is None:
                generation = _generation_prompt(prefix, i, prompt)
            history = prompt[: len(prompt) - len(generation or "")]
            if generation is None or not prompt.endswith(generation) or not full.text.startswith(history):
                fills = None  # the template rewrites the history as the conversation grows: render every turn
            elif fills(prompt):
                full.beyond_limit_turns = len(trained) - n
                break
        upto = full.text if i + 1 == len(messages) else prefix(i + 1, False)
        if not upto.startswith(prompt):
            raise TemplateError(where + _prefix_problem(render, messages, i, prompt, upto))
        end = _answer_end(upto, len(prompt))
        _check_turn_rendered(messages[i], upto[len(prompt):end], i, where)
        if full.text.startswith(upto):
            sample = full
        else:
            sample = _span_sample(prefix, messages, i, upto, spans)
            if sample is None:
                sample = RenderedSample(upto, own_turn=True)
            if all(s is not sample for s in own):  # a span's sample is shared by its turns
                own.append(sample)
        _add_span(sample, len(prompt), end, stop_tokens)
        sample.trained_turns += 1
        reasoning = (messages[i].get("reasoning_content") or "").strip()
        if reasoning and reasoning not in upto[len(prompt):end]:
            sample.unrendered_reasoning += 1
    if plain_tokens:
        for sample in (full, *own):
            sample.plain = _content_token_spans(sample.text, messages, plain_tokens, where)
    return [full, *own]


def _prefixes(render: Renderer, messages: Messages, tools: Sequence[dict], check: bool) -> PrefixRender:
    """render(k, add_generation_prompt) of messages[:k]: by `render.prefixes` where set, else by `render`."""

    def slow(k: int, add_generation_prompt: bool) -> str:
        return render(messages[:k], add_generation_prompt, tools)

    bind = getattr(render, "prefixes", None)
    if bind is None:
        return slow
    fast = bind(messages, tools)
    if not check:
        return fast

    def checked(k: int, add_generation_prompt: bool) -> str:
        text = slow(k, add_generation_prompt)
        try:
            same = fast(k, add_generation_prompt) == text
        except Exception:  # noqa: BLE001 - any difference from apply_chat_template turns the fast path off
            same = False
        if not same and render.prefixes is not None:
            render.prefixes = None
            print("note: rendering chat histories directly differs from apply_chat_template with this transformers; "
                  "using apply_chat_template (slower, same result)", file=sys.stderr, flush=True)
        return text

    return checked


def _span_sample(prefix: PrefixRender, messages: Messages, i: int, upto: str,
                 spans: dict[int, RenderedSample]) -> RenderedSample | None:
    """The sample of turn i's user-query span (the conversation cut before the next user message), when turn i
    renders inside it exactly as in its own prefix `upto`; None when it does not."""
    end = next((j for j in range(i + 1, len(messages)) if messages[j]["role"] == "user"), len(messages))
    if end not in spans:
        spans[end] = RenderedSample(upto if end == i + 1 else prefix(end, False), own_turn=True)
    return spans[end] if spans[end].text.startswith(upto) else None


def _generation_prompt(prefix: PrefixRender, k: int, prompt: str) -> str | None:
    """What add_generation_prompt=True appends to the rendered history ('<|im_start|>assistant\\n', with
    '<think>\\n' for thinking-only models); None when the prompt does not extend the history's rendering."""
    try:
        bare = prefix(k, False)
    except Exception:  # noqa: BLE001 - a template that will not render a history ending in a user turn: no bound
        return None
    return prompt[len(bare):] if prompt.startswith(bare) else None


def turn_structure_tokens(tokenizer: Any, render: Renderer, stop_tokens: Sequence[str]) -> list[str]:
    """The special tokens the template opens and closes turns with (found by rendering a probe conversation), plus
    bos/eos and the end-of-turn tokens: the strings that must not appear as tokens inside a message's text."""
    special = set(tokenizer.all_special_tokens)
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    probe = [{"role": role, "content": "x"} for role in ("system", "user", "assistant", "user", "assistant")]
    try:
        text = render(probe, True)
    except Exception:  # noqa: BLE001 - a template that refuses the probe (e.g. no system role): use the stops only
        text = ""
    used = {token for token in special if token and token in text}
    used |= {t for t in (tokenizer.bos_token, tokenizer.eos_token, *stop_tokens) if t}
    return sorted(used, key=lambda t: (-len(t), t))


def content_control_tokens(messages: Messages, tokens: Sequence[str]) -> list[tuple[int, str]]:
    """(message index, token) for every turn-structure token written inside a message's text."""
    found = []
    for i, message in enumerate(messages):
        texts = [message.get("content") or "", message.get("reasoning_content") or ""]
        texts += [str(call["function"]["arguments"]) for call in message.get("tool_calls", [])]
        found += [(i, token) for token in tokens if any(token in text for text in texts)]
    return found


def _content_token_spans(text: str, messages: Messages, tokens: Sequence[str], where: str) -> list[tuple[int, int]]:
    """Character ranges of the control tokens that stand inside message contents of the rendered text (to be encoded
    as plain text), found by locating each content in order."""
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        content = message.get("content") or ""
        if not any(token in content for token in tokens):
            continue
        at = text.find(content, cursor)
        if at < 0:
            raise TemplateError(f"{where}messages[{i}] holds turn-structure tokens, and the chat template changes its "
                                "text when rendering it, so they cannot be encoded as plain text; remove them from "
                                "the data")
        for token in tokens:
            start = content.find(token)
            while start >= 0:
                spans.append((at + start, at + start + len(token)))
                start = content.find(token, start + len(token))
        cursor = at + len(content)
    return sorted(spans)


def _prefix_problem(render: Renderer, messages: Messages, i: int, prompt: str, upto: str) -> str:
    thinking_off = getattr(render, "template_kwargs", {}).get("enable_thinking") is False
    if thinking_off and (messages[i].get("reasoning_content") or "").strip():
        return (f"messages[{i}] carries reasoning_content, but --template_kwargs sets enable_thinking false: the "
                "template's generation prompt then closes an empty <think></think> block, so a turn with reasoning "
                "cannot follow it. Remove reasoning_content from the data, or leave enable_thinking on")
    return (f"the chat template is not prefix consistent: rendering the history with add_generation_prompt=True gives "
            f"{_tail(prompt)!r}, which is not how the assistant turn {i} starts in the rendered conversation "
            f"({_tail(upto[: len(prompt) + 20])!r}); the trained part cannot be located. Fix the template or pass "
            f"--template with one of: {', '.join(BUILTIN_TEMPLATES)}")


def _check_tools_rendered(text: str, tools: Sequence[dict], where: str) -> None:
    missing = [t["function"]["name"] for t in tools if t["function"]["name"] not in text]
    if missing:
        raise TemplateError(
            f"{where}the record declares tools ({', '.join(missing)}), but the chat template does not render them "
            "(it ignores `tools`), so the model would be trained to call functions it was never shown. Use a "
            "template with tool support (the model's own, or --template qwen / chatml), or remove the tools")


def _check_turn_rendered(message: dict, answer: str, i: int, where: str) -> None:
    for call in message.get("tool_calls", []):
        name = call["function"]["name"]
        if name not in answer:
            raise TemplateError(
                f"{where}messages[{i}] calls {name!r}, but the chat template renders no tool calls (the call is "
                "missing from the rendered turn), so the turn would be trained without it. Use a template with tool "
                "support (the model's own, or --template qwen / chatml)")


def _answer_end(upto: str, start: int) -> int:
    """End of the answer: the rendered turn without the whitespace the template writes after it."""
    return max(start, len(upto.rstrip()))


def _add_span(sample: RenderedSample, start: int, end: int, stop_tokens: Sequence[str]) -> None:
    """Record [start, end) and make sure an end-of-turn token is inside the trained span.

    Most templates close the assistant turn with a token (ChatML's <|im_end|>); GLM-style templates close it with the
    next turn's role token, and leave the last turn open: there the following stop token is trained, or the eos is
    appended, so the model learns to stop.
    """
    text = sample.text
    if not any(text[start:end].endswith(s) for s in stop_tokens):
        rest = text[end:]
        gap = len(rest) - len(rest.lstrip())
        following = next((s for s in stop_tokens if rest[gap:].startswith(s)), None)
        if following is not None:
            end += gap + len(following)
        elif not rest.strip():
            sample.text = text[:end] + stop_tokens[0] + text[end:]
            end += len(stop_tokens[0])
            sample.eos_appended = True
        else:
            sample.unstopped_turns += 1
    sample.spans.append((start, end))


def _tail(text: str, n: int = 60) -> str:
    return text if len(text) <= n else "..." + text[-n:]


# --------------------------------------------------------------------------------------------------------------
# Tokens and labels
# --------------------------------------------------------------------------------------------------------------
