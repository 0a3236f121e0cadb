"""One preference record -> a validated Conversation with `rejected` set (a DPO pair), or every problem of the record.

A pair is a prompt conversation and two final assistant turns answering it, `chosen` and `rejected`. Four layouts are
accepted, detected per record from its keys (`format` of the Conversation in brackets):

* **Whole conversations** (TRL's implicit prompt, Anthropic HH as messages) [pairs-messages]::

      {"chosen": [{"role": "user", ...}, {"role": "assistant", ...}], "rejected": [same prompt, other answer]}

* **Prompt plus completions** (TRL's explicit prompt) [pairs-prompt]::

      {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}   (or a message object)
      {"prompt": "text", "chosen": "text", "rejected": "text"}                          (TRL's plain-text format)
      {"prompt": "text", "chosen": [user, assistant], "rejected": [user, assistant], "messages": ...}  (UltraFeedback)

* **A prompt list plus final turn objects** (LLaMA-Factory) [pairs-sharegpt]::

      {"conversations": [.., {"from": "human", ...}], "chosen": {"from": "gpt", ...}, "rejected": {...}}
      {"messages": [.., {"role": "user", ...}], "chosen": {"role": "assistant", ...}, "rejected": {...}}

* **Alpaca** (LLaMA-Factory) [pairs-alpaca]: ``instruction``/``input``/``system``/``history``, ``chosen``/``rejected``
  texts.

Each side (prompt + chosen, prompt + rejected) is built as a record of records.py's format and checked by its code,
so tool calls, tool results, reasoning and system prompts are held to the same rules as supervised data; problems
are reported at the pair's own field paths. Only the final turn is compared in preference training, so every
assistant turn of the prompt is masked.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from chattune.data.problems import Problem, RecordProblems, plural, show, type_name
from chattune.data.records import (
    _KNOWN_FORMATS,
    _MESSAGES,
    _SHAREGPT,
    _TRAIN_KEYS,
    Conversation,
    _alpaca_messages,
    _detect_format,
    _not_sft,
    _turn_index,
    _turn_messages,
    _TurnFormat,
    _unknown_format,
)
from chattune.data.tools import parse_tools

_SIDES = ("chosen", "rejected")
_PAIR_FORMATS = ("expected a preference pair: `chosen` and `rejected`, with `prompt`, `conversations`, `messages` or "
                 "`instruction` (or whole conversations as chosen/rejected)")
_SAME_PROMPT = ("a pair's chosen and rejected must continue the same prompt (only the final assistant turn differs): "
                "make the turns before it identical, or remove the record")
_IDENTICAL = ("chosen and rejected are identical; a pair must differ in its final answer (remove the record, or pass "
              "--skip_invalid_records to drop such pairs, counted in the report)")

Entry = tuple[object, str, bool]  # (turn as the data holds it, its field path, True: made from a plain-text field)
Sides = tuple[list[dict], dict]  # (prompt + chosen messages, rejected final message)


def normalize_pair(record: object, *, file: str, where: str) -> tuple[Conversation | None, list[Problem]]:
    """Validate one preference record and turn it into a Conversation with `rejected` set; (None, problems) when
    anything is wrong."""
    out = RecordProblems(file, where)
    if not_pair := _not_a_pair(record):
        out.add("", not_pair)
        return None, out.items
    for side in _SIDES:
        if record.get(side) is None:
            state = "is missing" if side not in record else "is null"
            out.add(side, f"{state}; a preference pair needs both a `chosen` and a `rejected` final answer")
    if out.items:
        return None, out.items
    fmt, build = _detect(record)
    tools = parse_tools(record, out)
    sides = build(record, out, tools)
    out.items = list(dict.fromkeys(out.items))  # a shared prompt is checked once per side: report it once
    if sides is not None and not out.items and sides[0][-1] == sides[1]:
        out.add("", _IDENTICAL)
    if sides is None or out.items:
        return None, out.items
    messages, rejected = sides
    masked = tuple(i for i, m in enumerate(messages[:-1]) if m["role"] == "assistant")
    source = ": ".join(part for part in (file, where) if part)
    return Conversation(tuple(messages), source, fmt, tuple(tools), masked, rejected), []


def pair_record(conv: Conversation) -> dict:
    """The canonical record of a pair, which normalize_pair reads back to an equal Conversation (format
    "pairs-prompt"): {"prompt": [...], "chosen": [final], "rejected": [final], "tools": [...] (only when any)}. No
    `train` flags: a pair's prompt turns are never trained, whatever the record says."""
    record: dict = {"prompt": [dict(m) for m in conv.messages[:-1]], "chosen": [dict(conv.messages[-1])],
                    "rejected": [dict(conv.rejected or {})]}
    if conv.tools:
        record["tools"] = list(conv.tools)
    return record


def _not_a_pair(record: object) -> str | None:
    """A record that is not a pair at all: say what it is, since supervised data given to a pair stage is common."""
    if not isinstance(record, dict):
        return _unknown_format(record).replace(_KNOWN_FORMATS, _PAIR_FORMATS)
    if all(record.get(side) is None for side in _SIDES):
        if _detect_format(record) is None:
            return _unknown_format(record).replace(_KNOWN_FORMATS, _PAIR_FORMATS)
        return ("record is a supervised conversation, not a preference pair (`chosen`/`rejected`); --stage dpo trains "
                "on pairs: train this data with --stage sft, or give each record a `chosen` and a `rejected` answer")
    # Multimodal pairs would train their placeholders as text; `label` (KTO) is not what is asked about here.
    return _not_sft({key: value for key, value in record.items() if key not in (*_SIDES, "label")})


def _detect(record: dict) -> tuple[str, Callable[[dict, RecordProblems, list[dict]], Sides | None]]:
    """Layout of a pair record. Non-null keys decide (Parquet fills unused columns with nulls); UltraFeedback's
    `messages` beside its `prompt` is a copy of chosen, and ignored."""
    if record.get("prompt") is not None:
        return "pairs-prompt", _prompt_pair
    if record.get("conversations") is not None:
        return "pairs-sharegpt", lambda r, out, tools: _turns_pair(r, _SHAREGPT, out, tools)
    if record.get("messages") is not None and not isinstance(record["chosen"], list):
        return "pairs-sharegpt", lambda r, out, tools: _turns_pair(r, _MESSAGES, out, tools)
    if record.get("instruction") is not None:
        return "pairs-alpaca", _alpaca_pair
    return "pairs-messages", _whole_pair


# --------------------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------------------


def _whole_pair(record: dict, out: RecordProblems, tools: list[dict]) -> Sides | None:
    """chosen and rejected are whole conversations: the prompt is every turn but the last, and must be the same."""
    built = {}
    for side in _SIDES:
        turns = record[side]
        if not isinstance(turns, list) or not turns:
            got = "an empty list" if turns == [] else type_name(turns)
            out.add(side, f"must be a list of messages ending with the final assistant turn, got {got} (without "
                          "`prompt`, chosen and rejected are whole conversations)")
            continue
        entries = [(turn, f"{side}[{i}]", False) for i, turn in enumerate(turns)]
        built[side] = _side_messages(record, _MESSAGES, entries, side, out, tools)
    if out.items:
        return None
    chosen, rejected = built["chosen"], built["rejected"]
    head = len(chosen) - len(record["chosen"])  # the top-level system message, if any
    _prompt_difference(chosen[:-1], rejected[:-1], head, out)
    return chosen, rejected[-1]


def _prompt_difference(chosen: list[dict], rejected: list[dict], head: int, out: RecordProblems) -> None:
    """Where rejected's prompt first differs from chosen's; compared normalized, so a null field equals a missing
    one."""
    for j, (a, b) in enumerate(zip(chosen, rejected)):
        for key in dict.fromkeys([*a, *b]):
            if a.get(key) != b.get(key):
                out.add(f"rejected[{j - head}].{key}", f"differs from chosen[{j - head}].{key}; {_SAME_PROMPT}")
                return
    if len(chosen) != len(rejected):
        out.add("rejected", f"has {plural(len(rejected) - head, 'turn')} before its final answer and chosen has "
                            f"{len(chosen) - head}; {_SAME_PROMPT}")


def _prompt_pair(record: dict, out: RecordProblems, tools: list[dict]) -> Sides | None:
    """TRL: `prompt` is messages or text; chosen/rejected one message, or text. A text prompt with conversations as
    chosen/rejected (UltraFeedback, Argilla) repeats the prompt in them: the conversations are the pair."""
    prompt, chosen = record["prompt"], record["chosen"]
    if isinstance(prompt, str) and isinstance(chosen, list) and len(chosen) > 1:
        return _whole_pair(record, out, tools)
    if isinstance(prompt, str):
        return _completions_pair(record, _MESSAGES, [({"role": "user", "content": prompt}, "prompt", True)], "prompt",
                                 out, tools)
    if not isinstance(prompt, list) or not prompt:
        got = "an empty list" if prompt == [] else type_name(prompt)
        out.add("prompt", f"must be a list of messages ending with a user turn, or a string, got {got}")
        return None
    return _completions_pair(record, _MESSAGES, [(turn, f"prompt[{i}]", False) for i, turn in enumerate(prompt)],
                             "prompt", out, tools)


def _turns_pair(record: dict, spec: _TurnFormat, out: RecordProblems, tools: list[dict]) -> Sides | None:
    """LLaMA-Factory: the prompt's turns under `conversations` (or `messages`), the final turns as objects."""
    turns = record[spec.list_key]
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if turns == [] else type_name(turns)
        out.add(spec.list_key, f"must be a list of the prompt's turns, ending with a user turn, got {got}")
        return None
    prompt = [(turn, f"{spec.list_key}[{i}]", False) for i, turn in enumerate(turns)]
    return _completions_pair(record, spec, prompt, spec.list_key, out, tools)


def _completions_pair(record: dict, spec: _TurnFormat, prompt: list[Entry], prompt_key: str, out: RecordProblems,
                      tools: list[dict]) -> Sides | None:
    finals = {side: _final_turn(record[side], side, spec, prompt_key, out) for side in _SIDES}
    if any(final is None for final in finals.values()):
        return None
    chosen = _side_messages(record, spec, [*prompt, finals["chosen"]], "chosen", out, tools)
    rejected = _side_messages(record, spec, [*prompt, finals["rejected"]], "rejected", out, tools)
    return chosen, rejected[-1]


def _final_turn(value: object, side: str, spec: _TurnFormat, prompt_key: str, out: RecordProblems) -> Entry | None:
    """chosen/rejected as one final turn: a turn object, a list of one, or the answer's text."""
    if isinstance(value, str):
        return {spec.role_key: "assistant", spec.content_key: value}, side, True
    if isinstance(value, dict):
        return value, side, False
    if isinstance(value, list) and len(value) == 1:
        return value[0], f"{side}[0]", False
    if isinstance(value, list) and value:
        out.add(side, f"has {len(value)} messages; a pair compares one final assistant turn: keep only it (the turns "
                      f"before it belong in `{prompt_key}`)")
    else:
        got = "an empty list" if value == [] else type_name(value)
        out.add(side, f"must be the final assistant message (an object, a list of one, or its text), got {got}")
    return None


def _alpaca_pair(record: dict, out: RecordProblems, tools: list[dict]) -> Sides | None:
    """LLaMA-Factory's Alpaca pairs: each side is the Alpaca record with that text as its `output`."""
    built = []
    for side in _SIDES:
        local = RecordProblems(out.file, out.where)
        built.append(_alpaca_messages({**record, "output": record[side]}, local, tools))
        for problem in local.items:
            out.add(side if problem.field == "output" else problem.field, problem.message)
    return built[0], built[1][-1]


# --------------------------------------------------------------------------------------------------------------
# One side: prompt + final turn, checked as a supervised record
# --------------------------------------------------------------------------------------------------------------


def _side_messages(record: dict, spec: _TurnFormat, entries: list[Entry], side: str, out: RecordProblems,
                   tools: list[dict]) -> list[dict]:
    """records.py's checks of the prompt + one final turn as a `spec` record, problems at the pair's own paths."""
    local = RecordProblems(out.file, out.where)
    synthetic = {spec.list_key: [turn for turn, _, _ in entries], "system": record.get("system")}
    messages = _turn_messages(synthetic, spec, local, tools)
    if own := _order_problems(entries, spec, side):
        # They say better what the alternation check says about the final turn, and replace it.
        final_role = f"{spec.list_key}[{len(entries) - 1}].{spec.role_key}"
        local.items = [p for p in local.items if p.field not in (final_role, spec.list_key)]
        for field, message in own:
            local.add(field, message)
        local.items.sort(key=lambda p: _turn_index(p.field, spec.list_key))
    for problem in local.items:
        out.add(_pair_path(problem.field, spec, entries), problem.message)
    _untrained_final(entries[-1], out)
    for message in messages:
        if message is not None:
            message.pop("__train__", None)  # the prompt's turns are never trained, the final one always compared
    return messages


def _role(turn: object, spec: _TurnFormat) -> str | None:
    raw = turn.get(spec.role_key) if isinstance(turn, dict) else None
    return spec.roles.get(raw) if isinstance(raw, str) else None


def _order_problems(entries: list[Entry], spec: _TurnFormat, side: str) -> list[tuple[str, str]]:
    """The final turn is the assistant's answer to the prompt's last turn, a user turn or a tool result. Unknown
    roles are left to records.py's report."""
    roles = [_role(turn, spec) for turn, _, _ in entries]

    def problem(i: int, message: str) -> list[tuple[str, str]]:
        return [(f"{spec.list_key}[{i}].{spec.role_key}", f"= {show(entries[i][0][spec.role_key])}; {message}")]

    if roles[-1] not in (None, "assistant"):
        return problem(len(roles) - 1, f"{side} must end with an assistant turn: the answer a pair compares")
    if roles[-1] == "assistant" and len(roles) > 1 and roles[-2] in ("assistant", "system"):
        return problem(len(roles) - 2, f"a pair's prompt must end with a user turn or a tool result, which chosen and "
                                       f"rejected answer: remove the trailing {roles[-2]} turn or add the user turn "
                                       "after it")
    return []


def _pair_path(field: str, spec: _TurnFormat, entries: list[Entry]) -> str:
    """A problem's field in the synthetic record ("messages[3].content") -> in the pair ("chosen.content")."""
    if not field.startswith(spec.list_key + "["):
        return field  # "system"
    _, path, from_text = entries[int(_turn_index(field, spec.list_key))]
    rest = field[field.index("]") + 1 :]
    return path if from_text and rest == f".{spec.content_key}" else path + rest


def _untrained_final(entry: Entry, out: RecordProblems) -> None:
    """`train: false` (or loss false, weight 0) on the final turn would leave nothing to compare."""
    turn, path, _ = entry
    for key in _TRAIN_KEYS if isinstance(turn, dict) else ():
        value = turn.get(key)
        if value is False or (key == "weight" and not isinstance(value, bool) and value == 0):
            out.add(f"{path}.{key}", f"= {json.dumps(value)}; a pair's final turn is always compared (only the "
                                     "prompt's turns are never trained): remove the flag")
