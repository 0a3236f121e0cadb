"""Read, validate and normalize conversation data files.

Every record is turned into a list of chat messages ``{"role": "system"|"user"|"assistant", "content": str}``.
Three record formats are accepted; the format is detected per record from its keys, so one file may mix them:

* **ShareGPT** (``conversations``)::

      {"system": "optional", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}

  ``from`` is ``user``/``human``, ``assistant``/``gpt`` or ``system``. A top-level ``system`` becomes a leading
  system message (and then no system turn may appear inside ``conversations``).

* **OpenAI / Hugging Face messages** (``messages``)::

      {"messages": [{"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello", "reasoning_content": "optional thinking"}]}

  ``reasoning_content`` (a string, assistant messages only) is kept for templates that render it.

* **Alpaca** (``instruction`` / ``output``)::

      {"system": "optional", "history": [["earlier question", "earlier answer"]],
       "instruction": "Translate", "input": "optional, appended after a newline", "output": "Übersetzen"}

All formats must give: an optional first system message, then turns alternating user, assistant (starting with
user), ending with a non-empty assistant turn. Every problem of a record is reported with its field path.

Files: ``.parquet`` is read as rows; any other file is JSON by content (a UTF-8 BOM is ignored): a JSON array of
records, a single JSON object, or JSONL (one JSON object per line). A directory means its ``*.json``, ``*.jsonl`` and
``*.parquet`` files, or a ``datasets`` ``save_to_disk`` directory. ``null`` optional fields count as absent, because
Parquet / ``datasets`` fill the columns a row does not use with nulls.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chattune.errors import UserError

__all__ = ["Conversation", "DataError", "LoadResult", "Problem", "load_conversations", "normalize_record"]

MAX_SHOWN_PROBLEMS = 20
DATA_EXTENSIONS = (".json", ".jsonl", ".parquet")
# dataset_dict.json marks a saved DatasetDict; its splits are subdirectories holding the other two files.
_SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_UTF8_BOM = b"\xef\xbb\xbf"
_KNOWN_FORMATS = "expected `conversations` (ShareGPT), `messages` (OpenAI) or `instruction`/`output` (Alpaca)"
_ALTERNATION = "after the optional system turn, turns must alternate user, assistant, starting with user"
_JSONL_RULE = "each line of a JSONL file must be one JSON object"
_SKIP_HINT = "Fix the records above, or pass --skip_invalid_records to drop them (the count is reported)."
_FILE_HINT = "Fix or remove these paths; --skip_invalid_records drops invalid records, never unreadable files."


class DataError(UserError):
    """Unusable training data. The multi-line message lists the problems and the fix; the CLI prints it as is."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, located precisely enough to find and fix it."""

    file: str  # path as the user gave it / as found in a directory
    where: str  # "record 12" (0-based) or "line 13" (1-based, JSONL); "" for file-level problems
    field: str  # "conversations[3].from", "output", ...; "" when not about one field
    message: str  # reads as a predicate of the field ("= 'gpt4'; expected ...", "is missing; ...")

    def __str__(self) -> str:
        # The message continues the field path ("conversations[3].from = 'gpt4'"), so those two join with a space.
        detail = f"{self.field} {self.message}" if self.field else self.message
        return ": ".join(part for part in (self.file, self.where, detail) if part)


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]  # {"role", "content"} (+ "reasoning_content", "tool_calls", tool "name"/"tool_call_id")
    source: str  # "train.json: record 12", for error messages later on
    format: str  # "sharegpt" | "messages" | "alpaca"
    tools: tuple[dict, ...] = ()  # {"type": "function", "function": {"name", "description", "parameters"}}
    masked: tuple[int, ...] = ()  # indices of assistant messages the data marks as not trained (train: false, ...)


@dataclass
class LoadResult:
    conversations: list[Conversation]
    files: list[str]
    skipped: list[Problem] = field(default_factory=list)  # problems of the records dropped by skip_invalid
    skipped_records: int = 0
    format_counts: dict[str, int] = field(default_factory=dict)  # format -> conversations kept


# --------------------------------------------------------------------------------------------------------------
# Record normalization
# --------------------------------------------------------------------------------------------------------------

_TYPE_NAMES = {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}


def _type_name(value: object) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)


def _show(value: str, limit: int = 40) -> str:
    """repr() of a user string, shortened so one bad value cannot flood the error message."""
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


class _Problems:
    """Collects the problems of one record; `add(field, message)` keeps the call sites short."""

    def __init__(self, file: str, where: str) -> None:
        self.file, self.where, self.items = file, where, []

    def add(self, field_path: str, message: str) -> None:
        self.items.append(Problem(self.file, self.where, field_path, message))


@dataclass(frozen=True)
class _TurnFormat:
    """Key names and role vocabulary of a list-of-turns format (ShareGPT, messages)."""

    name: str
    list_key: str
    role_key: str
    content_key: str
    roles: dict[str, str]  # role as written in the data -> canonical role

    @property
    def accepted(self) -> str:
        return ", ".join(self.roles)


_SHAREGPT = _TurnFormat(
    "sharegpt", "conversations", "from", "value",
    {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system",
     "function_call": "assistant", "observation": "tool"},
)  # fmt: skip
_MESSAGES = _TurnFormat(
    "messages", "messages", "role", "content",
    {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"},
)


def _string_problem(value: object, missing: bool, expected: str = "a string") -> str | None:
    """Message for a value that should be a string, or None when it is one."""
    if missing:
        return f"is missing; expected {expected}"
    if value is None:
        return f"is null; expected {expected}"
    if not isinstance(value, str):
        return f"must be a string, got {_type_name(value)}"
    return None


def _reply_problem(text: str) -> str | None:
    """An empty reply would train the model to answer with nothing."""
    if text.strip():
        return None
    kind = "is empty" if text == "" else "is whitespace only"
    return f"{kind}; an assistant turn needs a non-empty reply"


def _parse_role(turn: dict, path: str, spec: _TurnFormat, out: _Problems) -> str | None:
    """Canonical role of a turn, or None (problem reported) when it is missing or unknown."""
    role_path = f"{path}.{spec.role_key}"
    if spec.role_key not in turn or turn[spec.role_key] is None:
        state = "is missing" if spec.role_key not in turn else "is null"
        out.add(role_path, f"{state}; expected one of {spec.accepted}")
        return None
    raw = turn[spec.role_key]
    if not isinstance(raw, str):
        out.add(role_path, f"must be a string, got {_type_name(raw)}; expected one of {spec.accepted}")
        return None
    if raw not in spec.roles:
        out.add(role_path, f"= {_show(raw)}; expected one of {spec.accepted}")
        return None
    return spec.roles[raw]


def _parse_turn(turn: object, path: str, spec: _TurnFormat, out: _Problems) -> tuple[str | None, dict | None]:
    """(canonical role or None, message dict or None) of one turn; problems go to `out`."""
    if not isinstance(turn, dict):
        example = f'{{"{spec.role_key}": ..., "{spec.content_key}": ...}}'
        out.add(path, f"must be an object like {example}, got {_type_name(turn)}")
        return None, None
    role = _parse_role(turn, path, spec, out)
    if spec is _SHAREGPT and turn.get(spec.role_key) == "function_call":
        message = _sharegpt_call(turn.get(spec.content_key), f"{path}.{spec.content_key}", out)
    else:
        message = _turn_content(turn, role, path, spec, out)
    if message is not None and spec is _MESSAGES:
        _add_message_extras(turn, role, path, message, out)
    if message is not None and role == "assistant":
        message["__train__"] = _train_flag(turn, path, out)
    elif role is not None:
        _no_train_flag(turn, role, path, out)
    return role, (None if role is None else message)


def _turn_content(turn: dict, role: str | None, path: str, spec: _TurnFormat, out: _Problems) -> dict | None:
    content = turn.get(spec.content_key)
    content_path = f"{path}.{spec.content_key}"
    calls = turn.get("tool_calls") if spec is _MESSAGES and role == "assistant" else None
    if calls is not None and (content is None or content == ""):  # a call with no text: content may be null
        return {"role": role, "content": ""}
    problem = _string_problem(content, spec.content_key not in turn)
    if isinstance(content, list):  # OpenAI multimodal parts: say why a list is refused
        problem += " (content parts are not supported; join them into one string)"
    if problem is None and role == "assistant" and calls is None:
        problem = _reply_problem(content)
    if problem:
        out.add(content_path, problem)
        return None
    return {"role": role, "content": content}


def _add_message_extras(turn: dict, role: str | None, path: str, message: dict, out: _Problems) -> None:
    """reasoning_content and tool_calls of assistant messages; name and tool_call_id of tool messages."""
    if turn.get("reasoning_content") is not None:
        _add_reasoning(turn["reasoning_content"], role, f"{path}.reasoning_content", message, out)
    if turn.get("tool_calls") is not None:
        if role != "assistant":
            out.add(f"{path}.tool_calls", f"is only allowed on assistant messages, not on a {role} message")
        else:
            message["tool_calls"] = _tool_calls(turn["tool_calls"], f"{path}.tool_calls", out)
    if role == "tool":
        for key in ("name", "tool_call_id"):
            value = turn.get(key)
            if value is not None and not isinstance(value, str):
                out.add(f"{path}.{key}", f"must be a string, got {_type_name(value)}")
            elif value is not None:
                message[key] = value


def _add_reasoning(reasoning: object, role: str | None, path: str, message: dict, out: _Problems) -> None:
    if not isinstance(reasoning, str):
        out.add(path, f"must be a string, got {_type_name(reasoning)}")
    elif role is not None and role != "assistant":
        out.add(path, f"is only allowed on assistant messages, not on a {role} message")
    else:
        message["reasoning_content"] = reasoning


# --------------------------------------------------------------------------------------------------------------
# Tool calls (OpenAI messages; ShareGPT function_call / observation as LLaMA-Factory and glaive write them)
# --------------------------------------------------------------------------------------------------------------


def _tool_calls(calls: object, path: str, out: _Problems) -> list[dict]:
    """OpenAI `tool_calls` in the form chat templates read: {"type": "function", "function": {"name", "arguments":
    an object}} (a JSON-string `arguments` is parsed; an `id` is kept)."""
    if not isinstance(calls, list) or not calls:
        out.add(path, f"must be a non-empty list of calls, got {_type_name(calls) if calls != [] else 'an empty list'}")
        return []
    parsed = []
    for i, call in enumerate(calls):
        where = f"{path}[{i}]"
        if not isinstance(call, dict):
            out.add(where, f'must be an object like {{"type": "function", "function": {{"name": ..., "arguments": '
                           f'...}}}}, got {_type_name(call)}')
            continue
        function = call.get("function", call)  # some data writes {"name", "arguments"} without the wrapper
        name = _call_name(function, f"{where}.function.name" if "function" in call else f"{where}.name", out)
        arguments = _call_arguments(function, f"{where}.function.arguments" if "function" in call
                                    else f"{where}.arguments", out)
        if name is not None and arguments is not None:
            entry = {"type": "function", "function": {"name": name, "arguments": arguments}}
            if isinstance(call.get("id"), str):
                entry["id"] = call["id"]
            parsed.append(entry)
    return parsed


def _call_name(function: object, path: str, out: _Problems) -> str | None:
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        out.add(path, "is missing; a tool call needs the name of the function it calls")
        return None
    return name


def _call_arguments(function: dict, path: str, out: _Problems) -> dict | None:
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            out.add(path, f"is not valid JSON ({e.msg} at column {e.colno}): {_show(arguments)}")
            return None
    if not isinstance(arguments, dict):
        out.add(path, f"must be a JSON object of arguments, got {_type_name(arguments)}")
        return None
    return arguments


def _sharegpt_call(value: object, path: str, out: _Problems) -> dict | None:
    """A ShareGPT `function_call` turn: the assistant's call(s) as a JSON string {"name", "arguments"} (or a list)."""
    if not isinstance(value, str):
        out.add(path, f"must be a JSON string of the call, got {_type_name(value)}")
        return None
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as e:
        out.add(path, f'is not valid JSON ({e.msg} at column {e.colno}); expected {{"name": ..., "arguments": ...}}')
        return None
    calls = calls if isinstance(calls, list) else [calls]
    parsed = _tool_calls(calls, path, out)
    return {"role": "assistant", "content": "", "tool_calls": parsed} if parsed else None


def _tools(record: dict, out: _Problems) -> list[dict]:
    """Record-level `tools`: a list (or, as LLaMA-Factory writes it, a JSON string) of function schemas, each as
    {"type": "function", "function": {...}}; bare schemas are wrapped."""
    tools = record.get("tools")
    if tools is None or tools == "" or tools == []:
        return []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            out.add("tools", f"is not valid JSON ({e.msg} at column {e.colno}); expected a list of function schemas")
            return []
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        out.add("tools", f"must be a list of function schemas, got {_type_name(tools)}")
        return []
    wrapped = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            out.add(f"tools[{i}]", 'must be a function schema with a "name" (and "description", "parameters")')
            continue
        wrapped.append({"type": "function", "function": function})
    return wrapped


def _check_calls(messages: list[dict | None], tools: list[dict], spec: _TurnFormat, out: _Problems) -> None:
    """Every call names a declared tool; every tool result answers a call."""
    declared = [t["function"]["name"] for t in tools]
    pending: int | None = 0  # calls of the last assistant message not yet answered (None: unknown, turn invalid)
    for i, message in enumerate(messages):
        if message is None:
            pending = None  # its problem is reported; the tool results after it are not judged
            continue
        for j, call in enumerate(message.get("tool_calls", [])):
            name = call["function"]["name"]
            if name not in declared:
                known = f"declared: {', '.join(declared)}" if declared else "the record declares no `tools`"
                out.add(f"{spec.list_key}[{i}]" + (f".tool_calls[{j}]" if spec is _MESSAGES else ""),
                        f"calls {_show(name)}, which is not a declared tool ({known})")
        if message["role"] == "tool":
            if pending == 0:
                out.add(f"{spec.list_key}[{i}]", "is a tool result with no tool call before it to answer")
            pending = None if pending is None else max(0, pending - 1)
        else:
            pending = len(message.get("tool_calls", []))


# --------------------------------------------------------------------------------------------------------------
# What is trained, per message
# --------------------------------------------------------------------------------------------------------------

_TRAIN_KEYS = ("train", "loss", "weight")  # conventions of peer tools: train/loss booleans, weight 0 or 1


def _train_flag(turn: dict, path: str, out: _Problems) -> bool:
    trained = True
    for key in _TRAIN_KEYS:
        value = turn.get(key)
        if value is None:
            continue
        if key == "weight":
            if isinstance(value, bool) or value not in (0, 1):
                out.add(f"{path}.weight", f"= {value!r}; use 0 (not trained) or 1 (trained); other weights are not "
                                          "supported")
                continue
            trained = trained and value == 1
        elif not isinstance(value, bool):
            out.add(f"{path}.{key}", f"must be true or false, got {_type_name(value)}")
        else:
            trained = trained and value
    return trained


def _no_train_flag(turn: dict, role: str, path: str, out: _Problems) -> None:
    for key in _TRAIN_KEYS:
        if turn.get(key) is not None:
            out.add(f"{path}.{key}", f"is only meaningful on assistant turns (a {role} turn is never trained)")


def _check_order(turns: list, roles: list[str | None], messages: list[dict | None], spec: _TurnFormat,
                 top_system: bool, out: _Problems) -> None:
    """System placement, user/assistant alternation (tool results after the calling assistant turn) and the final
    assistant turn."""

    def bad_role(i: int, message: str) -> None:  # formats lazily: the common, valid case never pays for it
        out.add(f"{spec.list_key}[{i}].{spec.role_key}", f"= {_show(turns[i][spec.role_key])}; {message}")

    previous: str | None = "system"  # what came before the first turn: a user turn is expected next
    for i, role in enumerate(roles):
        if role is None:
            previous = None  # unknown role: do not guess what the next turn should be
        elif role == "system":
            if top_system:
                bad_role(i, "the top-level `system` is also given; keep only one of them")
            elif i > 0:
                bad_role(i, "a system turn is only allowed as the first turn")
        else:
            if role != "tool" and previous is not None and role not in _expected_after(previous):
                expected = {"assistant": "an assistant turn", "user": "a user turn",
                            "tool": "the tool results of the call before it"}[_expected_after(previous)[0]]
                bad_role(i, f"expected {expected}: {_ALTERNATION}")
            previous = "call" if role == "assistant" and (messages[i] or {}).get("tool_calls") else role
    if None in roles:
        return  # an unknown role may well be the missing assistant; that problem is already reported
    if "assistant" not in roles:
        out.add(spec.list_key, "has no assistant turn; add at least one assistant reply to train on")
    elif roles[-1] != "assistant":
        fix = f"remove the trailing {roles[-1]} turn or add the reply"
        bad_role(len(roles) - 1, f"the last turn must be an assistant turn: {fix}")


def _expected_after(previous: str) -> tuple[str, ...]:
    return {"system": ("user",), "user": ("assistant",), "assistant": ("user",), "call": ("tool",),
            "tool": ("assistant", "tool")}[previous]


def _top_level_system(record: dict, out: _Problems) -> str | None:
    """Optional `system` string of ShareGPT / Alpaca records; "" and null mean none (common in exported data)."""
    system = record.get("system")
    if system is None or system == "":
        return None
    if not isinstance(system, str):
        out.add("system", f"must be a string, got {_type_name(system)}")
        return None
    return system


def _turn_messages(record: dict, spec: _TurnFormat, out: _Problems, tools: list[dict]) -> list[dict]:
    turns = record[spec.list_key]
    if not isinstance(turns, list):
        out.add(spec.list_key, f"must be a list of turns, got {_type_name(turns)}")
        return []
    if not turns:
        out.add(spec.list_key, "is empty; expected a user turn followed by an assistant turn")
        return []
    first_problem = len(out.items)
    system = _top_level_system(record, out)
    parsed = [_parse_turn(turn, f"{spec.list_key}[{i}]", spec, out) for i, turn in enumerate(turns)]
    roles = [role for role, _ in parsed]
    messages = [message for _, message in parsed]
    _check_order(turns, roles, messages, spec, system is not None, out)
    _check_calls(messages, tools, spec, out)
    # Report in turn order, so the problems of one turn sit together, whichever check found them.
    out.items[first_problem:] = sorted(out.items[first_problem:], key=lambda p: _turn_index(p.field, spec.list_key))
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + messages


def _turn_index(field_path: str, list_key: str) -> float:
    """Sort key of a problem: "system" first, then "list[i]..." by i, then problems of the whole list."""
    if not field_path.startswith(list_key + "["):
        return -1 if field_path == "system" else float("inf")
    return int(field_path[len(list_key) + 1 : field_path.index("]")])


def _sharegpt_messages(record: dict, out: _Problems, tools: list[dict]) -> list[dict]:
    return _turn_messages(record, _SHAREGPT, out, tools)


def _openai_messages(record: dict, out: _Problems, tools: list[dict]) -> list[dict]:
    return _turn_messages(record, _MESSAGES, out, tools)


def _alpaca_string(record: dict, key: str, out: _Problems, *, required: bool, expected: str) -> str | None:
    value = record.get(key)
    if not required and value is None:
        return None
    problem = _string_problem(value, key not in record, expected)
    if problem:
        out.add(key, problem)
        return None
    return value


def _alpaca_history(record: dict, out: _Problems) -> list[dict]:
    history = record.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        out.add("history", f"must be a list of [user, assistant] pairs, got {_type_name(history)}")
        return []
    messages = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            got = f"a list of {_plural(len(pair), 'item')}" if isinstance(pair, list) else _type_name(pair)
            out.add(f"history[{i}]", f"must be a [user, assistant] pair of strings, got {got}")
            continue
        for j, role in enumerate(("user", "assistant")):
            problem = _string_problem(pair[j], False)
            if problem is None and role == "assistant":
                problem = _reply_problem(pair[j])
            if problem:
                out.add(f"history[{i}][{j}]", problem)
            messages.append({"role": role, "content": pair[j]})
    return messages


def _alpaca_messages(record: dict, out: _Problems, tools: list[dict]) -> list[dict]:
    system = _top_level_system(record, out)
    history = _alpaca_history(record, out)
    instruction = _alpaca_string(record, "instruction", out, required=True, expected="a string (the user prompt)")
    extra = _alpaca_string(record, "input", out, required=False, expected="a string")
    output = _alpaca_string(record, "output", out, required=True, expected="a string (the assistant reply)")
    if output is not None and (problem := _reply_problem(output)):
        out.add("output", problem)
    prompt = instruction if not extra else f"{instruction}\n{extra}"
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + history + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


# Key -> format, in detection order: a record with several of these keys uses the first one.
_FORMAT_KEYS = (
    ("conversations", "sharegpt"), ("messages", "messages"), ("instruction", "alpaca"), ("output", "alpaca")
)  # fmt: skip
_BUILDERS: dict[str, Callable[[dict, _Problems, list[dict]], list[dict]]] = {
    "sharegpt": _sharegpt_messages,
    "messages": _openai_messages,
    "alpaca": _alpaca_messages,
}


def _detect_format(record: dict) -> str | None:
    # Prefer keys with a value: Parquet rows of mixed-format data carry the other formats' columns as nulls.
    for keep in (lambda key: record.get(key) is not None, lambda key: key in record):
        for key, fmt in _FORMAT_KEYS:
            if keep(key):
                return fmt
    return None


def _unknown_format(record: object) -> str:
    if not isinstance(record, dict):
        name = _type_name(record)
        article = "" if name == "null" else "an " if name[0] in "aeiou" else "a "
        what = f"{article}{name}, not a JSON object"
    elif not record:
        what = "an empty object"
    else:
        keys = [str(key) for key in record]
        what = "keys: " + ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "")
    return f"record of no known format ({what}); {_KNOWN_FORMATS}"


def normalize_record(record: object, *, file: str, where: str) -> tuple[Conversation | None, list[Problem]]:
    """Validate one record and turn it into a Conversation; returns (None, problems) when anything is wrong."""
    out = _Problems(file, where)
    fmt = _detect_format(record) if isinstance(record, dict) else None
    not_sft = _not_sft(record) if isinstance(record, dict) else None
    if not_sft:
        out.add("", not_sft)
        return None, out.items
    if fmt is None:
        out.add("", _unknown_format(record))
        return None, out.items
    tools = _tools(record, out) if fmt != "alpaca" else []
    messages = _BUILDERS[fmt](record, out, tools)
    if out.items:
        return None, out.items
    masked = tuple(i for i, m in enumerate(messages) if m.pop("__train__", True) is False)
    source = ": ".join(part for part in (file, where) if part)
    return Conversation(messages=tuple(messages), source=source, format=fmt, tools=tuple(tools), masked=masked), []


_NOT_SFT = "this tool trains supervised chat data (every assistant answer is imitated)"
_MEDIA_TAGS = ("<image>", "<video>", "<audio>")


def _not_sft(record: dict) -> str | None:
    """Data for another kind of training, which would be trained wrong as plain chat: say what it is."""
    if "chosen" in record and "rejected" in record:
        return (f"a preference pair (`chosen`/`rejected`, DPO-style data); {_NOT_SFT}: train on the chosen "
                "conversations as `messages`, or use a preference-optimization trainer")
    if isinstance(record.get("label"), bool):
        return (f"KTO data (`label` marks whether the answer is one to imitate or not); {_NOT_SFT}: keep only the "
                "records with label true (and drop the field), or use a KTO trainer")
    media = [key for key in ("images", "videos", "audios") if record.get(key)]
    if media or _mentions_media(record):
        what = ", ".join(f"`{m}`" for m in media) or "image/video tags in the text"
        return (f"a multimodal record ({what}); this tool trains text-only chat models, and would train the "
                "placeholders as literal text: remove the media from the data, or use a vision-language trainer")
    return None


def _mentions_media(record: dict) -> bool:
    turns = record.get("messages") or record.get("conversations")
    if not isinstance(turns, list):
        return False
    texts = [t.get("content", t.get("value")) for t in turns if isinstance(t, dict)]
    return any(isinstance(text, str) and any(tag in text for tag in _MEDIA_TAGS) for text in texts)


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------


class _FileProblem(Exception):
    """A whole file cannot be used; the message reads as a predicate of the path ("is empty; ...")."""


@dataclass(frozen=True)
class _BadLine:
    """A JSONL line that is not JSON: a record-level problem, skippable like any invalid record."""

    message: str


Records = list[tuple[str, Any]]  # (where, record or _BadLine)


def _decode(raw: bytes) -> str:
    start = len(_UTF8_BOM) if raw.startswith(_UTF8_BOM) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = raw.count(b"\n", 0, offset) + 1
        raise _FileProblem(
            f"is not valid UTF-8: byte 0x{raw[offset]:02x} at byte offset {offset} (line {line}); "
            "the file must be UTF-8 encoded (re-save it as UTF-8)"
        ) from None


def _parse_jsonl(text: str) -> Records:
    records: Records = []
    # split("\n"), not splitlines(): JSON strings may legally contain raw U+2028 and other "line breaks".
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            message = f"not valid JSON: {e.msg} at column {e.colno}; {_JSONL_RULE}"
            records.append((f"line {number}", _BadLine(message)))
    return records


def _parse_json_text(text: str) -> Records:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        body = text.lstrip()
        first_line = text.count("\n", 0, len(text) - len(body)) + 1
        # A broken array is one broken document. So is a value that runs past its first line without closing
        # (a pretty-printed object): its lines are not JSONL records. "Extra data" means the first value parsed,
        # i.e. JSON Lines.
        if body.startswith("[") or (e.msg != "Extra data" and e.lineno > first_line):
            raise _FileProblem(f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return _parse_jsonl(text)
    if isinstance(value, list):
        return [(f"record {i}", record) for i, record in enumerate(value)]
    if "\n" not in text.strip():
        return _parse_jsonl(text)  # a one-line file is JSONL with one record: locate it as "line N" like longer ones
    return [("record 0", value)]


def _read_json_file(path: str) -> Records:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise _FileProblem(f"cannot be read: {e.strerror}") from None
    text = _decode(raw)
    if not text.strip():
        raise _FileProblem("is empty; expected a JSON array of records, one JSON object, or JSONL (one per line)")
    return _parse_json_text(text)


def _read_parquet_file(path: str) -> Records:
    import pyarrow as pa  # imported here: only Parquet users pay for it
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:
        raise _FileProblem(f"cannot be read as Parquet: {e}") from None
    return [(f"record {i}", row) for i, row in enumerate(rows)]


def _read_saved_dataset(path: str) -> Records:
    import datasets  # imported here: slow to import, and only save_to_disk directories need it

    try:
        dataset = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - any failure means the directory is unusable; say why, not a traceback
        raise _FileProblem(f"cannot be loaded with datasets.load_from_disk: {e}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            splits = ", ".join(dataset) or "none"
            raise _FileProblem(
                f"is a DatasetDict without a 'train' split (splits: {splits}); "
                f"pass the split's own directory instead, e.g. {os.path.join(path, next(iter(dataset), 'SPLIT'))}"
            )
        dataset = dataset["train"]
    return [(f"record {i}", row) for i, row in enumerate(dataset.to_list())]


def _read_source(path: str, kind: str) -> Records:
    if kind == "saved":
        return _read_saved_dataset(path)
    if path.lower().endswith(".parquet"):
        return _read_parquet_file(path)
    return _read_json_file(path)  # .json, .jsonl or anything else: decided by content


# --------------------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------------------


def _split_paths(data_path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """One path, "a.json,b.jsonl", or a list of paths (list items are not split on commas)."""
    if isinstance(data_path, (str, os.PathLike)):
        items = os.fspath(data_path).split(",")
    else:
        items = [os.fspath(p) for p in data_path]
    return [item.strip() for item in items if item.strip()]


def _expand_path(path: str) -> tuple[list[tuple[str, str]], Problem | None]:
    """[(path, kind)] to read for one given path (kind "file" or "saved"), or a file-level problem."""
    if not os.path.exists(path):
        return [], Problem(path, "", "", "does not exist")
    if not os.path.isdir(path):
        return [(path, "file")], None
    names = os.listdir(path)
    if any(marker in names for marker in _SAVE_TO_DISK_MARKERS):
        return [(path, "saved")], None
    # Hidden files are left out: editors and macOS ("._train.json") leave non-data files with data extensions.
    found = sorted(
        name for name in names
        if name.lower().endswith(DATA_EXTENSIONS) and not name.startswith(".")
        and os.path.isfile(os.path.join(path, name))
    )  # fmt: skip
    if not found:
        message = "is a directory without .json, .jsonl or .parquet files (subdirectories are not searched)"
        return [], Problem(path, "", "", message)
    return [(os.path.join(path, name), "file") for name in found], None


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _problem_lines(problems: list[Problem]) -> list[str]:
    lines = [f"  {problem}" for problem in problems[:MAX_SHOWN_PROBLEMS]]
    if len(problems) > MAX_SHOWN_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_SHOWN_PROBLEMS} more")
    return lines


def _file_names(problems: list[Problem]) -> str:
    names = list(dict.fromkeys(problem.file for problem in problems))
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more files" if len(names) > 5 else "")


@dataclass
class _Tally:
    """Running totals while reading all files."""

    conversations: list[Conversation] = field(default_factory=list)
    file_problems: list[Problem] = field(default_factory=list)
    record_problems: list[Problem] = field(default_factory=list)
    records: int = 0
    bad_records: int = 0

    def add_records(self, path: str, records: Records) -> None:
        self.records += len(records)
        for where, record in records:
            if isinstance(record, _BadLine):
                conversation, problems = None, [Problem(path, where, "", record.message)]
            else:
                conversation, problems = normalize_record(record, file=path, where=where)
            if problems:
                self.bad_records += 1
                self.record_problems.extend(problems)
            else:
                self.conversations.append(conversation)

    def error_message(self, skip_invalid: bool) -> str | None:
        sections = []
        if self.file_problems:
            head = f"Cannot use {_plural(len(self.file_problems), 'data path')}:"
            sections.append("\n".join([head, *_problem_lines(self.file_problems), _FILE_HINT]))
        if self.record_problems and not skip_invalid:
            head = (
                f"Found {_plural(len(self.record_problems), 'problem')} in {self.bad_records} of "
                f"{_plural(self.records, 'record')} ({_file_names(self.record_problems)}):"
            )
            sections.append("\n".join([head, *_problem_lines(self.record_problems), _SKIP_HINT]))
        return "\n\n".join(sections) or None


def _nothing_left_message(tally: _Tally, files: list[str]) -> str:
    names = ", ".join(files)
    if tally.records == 0:
        return f"No records in {names}; there is nothing to train on."
    lines = [
        f"No valid records in {names}: all {tally.records} were invalid and skipped; nothing is left to train on.",
        *_problem_lines(tally.record_problems),
    ]
    return "\n".join(lines)


def load_conversations(
    data_path: str | os.PathLike | Sequence[str | os.PathLike], *, skip_invalid: bool = False
) -> LoadResult:
    """Read every record of every file, validate all of them, and return the normalized conversations.

    Raises DataError listing the problems (first MAX_SHOWN_PROBLEMS of them) when any record is invalid, unless
    skip_invalid, which drops those records instead. Unreadable files always raise.
    """
    paths = _split_paths(data_path)
    if not paths:
        raise DataError("No data path given; pass a file, a directory, or several files separated by commas.")
    tally, files = _Tally(), []
    for given in paths:
        sources, problem = _expand_path(given)
        if problem:
            tally.file_problems.append(problem)
        for path, kind in sources:
            files.append(path)
            try:
                tally.add_records(path, _read_source(path, kind))
            except _FileProblem as e:
                tally.file_problems.append(Problem(path, "", "", str(e)))
    message = tally.error_message(skip_invalid)
    if message:
        raise DataError(message)
    if not tally.conversations:
        raise DataError(_nothing_left_message(tally, files))
    counts: dict[str, int] = {}
    for conversation in tally.conversations:
        counts[conversation.format] = counts.get(conversation.format, 0) + 1
    return LoadResult(
        conversations=tally.conversations,
        files=files,
        skipped=tally.record_problems if skip_invalid else [],
        skipped_records=tally.bad_records,
        format_counts=counts,
    )
