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

Files: ``.parquet`` is read as rows; any other file is JSON by content (a UTF-8 BOM is ignored, gzip-compressed
files are decompressed): a JSON array of records, a single JSON object, or JSONL (one JSON object per line). A
directory means its ``*.json``, ``*.jsonl``, ``*.json.gz``, ``*.jsonl.gz`` and ``*.parquet`` files (what else it holds
is listed in the report), or a ``datasets`` ``save_to_disk`` directory. ``null`` optional fields count as absent,
because Parquet / ``datasets`` fill the columns a row does not use with nulls. Files are read in bounded chunks
(`source_chunks`), so training can stream data of any size (chattune.stream).
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chattune.errors import UserError

__all__ = ["Conversation", "DataError", "LoadResult", "Problem", "load_conversations", "normalize_record"]

MAX_SHOWN_PROBLEMS = 20
DATA_EXTENSIONS = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")
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
    skipped: list[Problem] = field(default_factory=list)  # first problems of the records dropped by skip_invalid
    skipped_records: int = 0
    format_counts: dict[str, int] = field(default_factory=dict)  # format -> conversations kept
    ignored: list[str] = field(default_factory=list)  # entries of given directories not read, with why


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
    given = [key for key, _ in _FORMAT_KEYS if record.get(key) is not None]
    if len({dict(_FORMAT_KEYS)[key] for key in given}) > 1:
        keys = " and ".join(f"`{key}`" for key in given)
        out.add("", f"has both {keys}, which are different record formats: which one is the conversation is "
                "ambiguous; keep one")
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
# Reading files, in bounded chunks
# --------------------------------------------------------------------------------------------------------------

CHUNK_BYTES = 4 << 20  # JSON text is read in blocks of about this size
CHUNK_RECORDS = 2000  # Parquet / saved-dataset rows per chunk
_GZIP_MAGIC = b"\x1f\x8b"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class _FileProblem(Exception):
    """A whole file cannot be used; the message reads as a predicate of the path ("is empty; ...")."""


@dataclass(frozen=True)
class _BadLine:
    """A record that is not valid JSON: a record-level problem, skippable like any invalid record."""

    message: str


Records = list[tuple[str, Any]]  # (where, record or _BadLine)


@dataclass
class Chunk:
    """A bounded piece of one data file: whole JSONL lines as bytes, parsed where the chunk is processed (perhaps in
    a worker process), or records already parsed (JSON array, Parquet, saved dataset)."""

    file: str
    size: int  # bytes of the input file this chunk accounts for (progress)
    lines: bytes = b""
    first_line: int = 1  # line number of the first line of `lines`
    offset: int = 0  # byte offset of `lines` in the (decompressed) file
    records: Records | None = None


class _DuplicateKeys:
    """object_pairs_hook that notes repeated keys (json keeps the last one silently): a record with one is refused,
    because which value the writer meant is unknowable."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict:
        record = dict(pairs)
        if len(record) != len(pairs):
            seen: set[str] = set()
            self.found += [key for key, _ in pairs if key in seen or seen.add(key)]
        return record


_DUPLICATES = _DuplicateKeys()
_DECODER = json.JSONDecoder(object_pairs_hook=_DUPLICATES)


def _duplicate_problem() -> str | None:
    if not _DUPLICATES.found:
        return None
    keys = ", ".join(repr(k) for k in dict.fromkeys(_DUPLICATES.found))
    _DUPLICATES.found.clear()
    return f"an object repeats the key {keys}; JSON readers keep only one of the values: remove the duplicate"


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _surrogate(value: Any) -> str | None:
    """The first lone UTF-16 surrogate in the strings of a parsed record (json decodes a lone "\\ud83d" escape into
    a string that no tokenizer can encode)."""
    if isinstance(value, str):
        found = next((ch for ch in value if "\ud800" <= ch <= "\udfff"), None)
        return f"\\u{ord(found):04x}" if found else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((found for item in items if (found := _surrogate(item))), None)


def _checked(value: Any, raw: str) -> Any:
    """A parsed record, or a _BadLine for repeated keys or lone surrogates (looked for only when the raw text has a
    surrogate escape, so valid data pays nothing)."""
    duplicate = _duplicate_problem()
    if duplicate:
        return _BadLine(duplicate)
    if _SURROGATE_ESCAPE.search(raw):
        found = _surrogate(value)
        if found:
            return _BadLine(f"holds a lone UTF-16 surrogate ({found}), e.g. half of an emoji cut off by a truncation; "
                            "it is not text and cannot be tokenized: fix or remove that string")
    return value


def _parse_line(line: str) -> Any:
    """One JSONL line: the record, or a _BadLine saying why not."""
    _DUPLICATES.found.clear()
    try:
        value = _DECODER.decode(line)
    except json.JSONDecodeError as e:
        return _BadLine(f"not valid JSON: {e.msg.removesuffix(' at')} at column {e.colno}; {_JSONL_RULE}")
    except RecursionError:
        return _BadLine("not usable: its JSON is nested too deeply to read; a chat record needs a few levels only")
    return _checked(value, line)


def _parse_jsonl(text: str, first_line: int = 1) -> Records:
    records: Records = []
    # split("\n"), not splitlines(): JSON strings may legally contain raw U+2028 and other "line breaks".
    for number, line in enumerate(text.split("\n"), start=first_line):
        if line.strip():
            records.append((f"line {number}", _parse_line(line)))
    return records


def _utf8_problem(raw: bytes, error: UnicodeDecodeError, offset: int, first_line: int) -> str:
    line = first_line + raw.count(b"\n", 0, error.start)
    return (f"is not valid UTF-8: byte 0x{raw[error.start]:02x} at byte offset {offset + error.start} (line {line}); "
            "the file must be UTF-8 encoded (re-save it as UTF-8)")


def chunk_records(chunk: Chunk) -> Records:
    """The records of a chunk, parsing its JSONL lines if it carries them. Raises _FileProblem (bad UTF-8)."""
    if chunk.records is not None:
        return chunk.records
    try:
        text = chunk.lines.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _FileProblem(_utf8_problem(chunk.lines, e, chunk.offset, chunk.first_line)) from None
    return _parse_jsonl(text, chunk.first_line)


def _os_problem(error: OSError, verb: str = "be read") -> str:
    return f"cannot {verb}: {error.strerror or error}"


class _Reader:
    """Reads a (possibly gzip-compressed) file in blocks; `progress()` counts bytes of the file on disk."""

    def __init__(self, path: str) -> None:
        import gzip

        try:
            self.raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise _FileProblem(_os_problem(e)) from None
        head = self.raw.read(2)
        self.raw.seek(0)
        self.gzip = head == _GZIP_MAGIC
        self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb") if self.gzip else self.raw
        self.reported = 0

    def read(self, n: int = -1) -> bytes:
        import zlib

        try:
            return self.stream.read(n)
        except (OSError, EOFError, zlib.error) as e:
            if self.gzip:
                raise _FileProblem(f"is not a readable gzip file: {e}") from None
            raise _FileProblem(_os_problem(e) if isinstance(e, OSError) else str(e)) from None

    def progress(self) -> int:
        """Bytes of the file consumed since the last call."""
        position = self.raw.tell()
        delta, self.reported = position - self.reported, position
        return delta

    def close(self) -> None:
        self.raw.close()


def _nonblank_lines(buf: bytes, start: int, n: int) -> list[bytes]:
    """The first n complete non-blank lines of buf[start:]."""
    lines = []
    while len(lines) < n:
        end = buf.find(b"\n", start)
        if end < 0:
            break
        if buf[start:end].strip():
            lines.append(buf[start:end])
        start = end + 1
    return lines


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8", errors="replace"))
    except ValueError:
        return False
    except RecursionError:  # a value, too deep to read: a record problem of its line
        return True
    return True


def _check_encoding(head: bytes) -> None:
    if head.startswith(b"PAR1"):
        raise _FileProblem("is a Parquet file (it starts with PAR1); name it *.parquet")
    if head.startswith(_UTF16_BOMS) or head.startswith((b"\x00\x00\xfe\xff",)):
        raise _FileProblem("is UTF-16 or UTF-32 encoded (it starts with that byte-order mark); re-save it as UTF-8")
    if b"\x00" in head[:4096]:
        raise _FileProblem("holds NUL bytes: it looks UTF-16 or UTF-32 encoded (without a byte-order mark), or binary; "
                           "re-save it as UTF-8 text")


def _json_chunks(path: str, chunk_bytes: int, chunk_records: int) -> Iterator[Chunk]:
    """A JSON file by content: JSON Lines (streamed in blocks of whole lines), a JSON array (streamed record by
    record), or one JSON document (one record). gzip-compressed files are read the same way."""
    reader = _Reader(path)
    try:
        buf, eof = reader.read(chunk_bytes), False
        _check_encoding(buf)
        start = len(_UTF8_BOM) if buf.startswith(_UTF8_BOM) else 0
        while not eof and not buf[start:].strip():  # only blanks so far: read on to the first character
            more = reader.read(chunk_bytes)
            eof = not more
            buf += more
        first_at = len(buf) - len(buf[start:].lstrip())
        if first_at >= len(buf):
            raise _FileProblem("is empty; expected a JSON array of records, one JSON object, or JSONL (one per line)")
        if buf[first_at:first_at + 1] == b"[":  # streamed right away, however long its first line
            records = _array_chunks(path, reader, buf, start, eof, chunk_bytes, chunk_records)
            del buf  # the generator owns the first block now; this frame must not keep it alive
            yield from records
            return
        # JSON Lines or one document: decided on the first two complete non-blank lines.
        while not eof and len(_nonblank_lines(buf, start, 2)) < 2:
            more = reader.read(max(chunk_bytes, len(buf)))
            eof = not more
            buf += more
        lines = _nonblank_lines(buf + (b"\n" if eof else b""), start, 2)
        # JSON Lines when the first line is a value of its own, or the second an object (the first is then a broken
        # record, reported at its line and skippable like any other); else one (pretty-printed) document, unless
        # that fails on its first line too (a JSONL file whose first lines are broken).
        if _is_json(lines[0]) or (len(lines) > 1 and lines[1].lstrip().startswith(b"{") and _is_json(lines[1])):
            records = _jsonl_chunks(path, reader, buf, start, eof, chunk_bytes)
        else:
            if not eof:
                buf, eof = buf + reader.read(), True
            first_line = 1 + buf.count(b"\n", start, first_at)
            document = _parse_document(buf, start, first_line)
            if document is not None:
                yield Chunk(path, size=reader.progress(), records=document)
                return
            records = _jsonl_chunks(path, reader, buf, start, eof, chunk_bytes)
        del buf
        yield from records
    finally:
        reader.close()


def _jsonl_chunks(path: str, reader: _Reader, buf: bytes, start: int, eof: bool, chunk_bytes: int
                  ) -> Iterator[Chunk]:
    line, offset, pending = 1, start, buf[start:]
    del buf
    while pending:
        cut = len(pending) if eof else pending.rfind(b"\n") + 1
        if cut and (eof or cut >= chunk_bytes // 2):
            block, pending = pending[:cut], pending[cut:]
            yield Chunk(path, size=reader.progress(), lines=block, first_line=line, offset=offset)
            line += block.count(b"\n")
            offset += cut
        if not eof:
            more = reader.read(max(chunk_bytes, len(pending)))  # a line longer than a block: grow, do not rescan
            eof = not more
            pending += more


def _json_error(error: json.JSONDecodeError) -> str:
    return error.msg.removesuffix(" at")  # "Invalid control character at" + " at line ..." reads twice


def _parse_document(raw: bytes, start: int, first_line: int) -> Records | None:
    """The one record of a JSON document; None when it is not JSON already on its first line (then the file is
    JSON Lines with a broken first record)."""
    try:
        text = raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _FileProblem(_utf8_problem(raw[start:], e, start, 1)) from None
    _DUPLICATES.found.clear()
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        if e.lineno == first_line and e.msg != "Extra data":
            return None
        raise _FileProblem(f"is not valid JSON: {_json_error(e)} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise _FileProblem("is not usable: its JSON is nested too deeply to read") from None
    return [("record 0", _checked(value, text))]  # not an array: those start with "[" and are streamed


class _Text:
    """Incrementally decoded UTF-8 text of a file with line and column bookkeeping for error messages."""

    def __init__(self, reader: _Reader, raw: bytes, start: int, eof: bool, block: int) -> None:
        self.reader, self.block, self.eof = reader, block, eof
        self.text, self.carry = "", b""
        self.byte_offset, self.lines_before, self.dropped_lines, self.column_base = start, 1, 0, 0
        self._feed(raw[start:])

    def _feed(self, raw: bytes) -> None:
        raw = self.carry + raw
        try:
            self.text += raw.decode("utf-8")
            self.carry = b""
        except UnicodeDecodeError as e:
            # A character split across two blocks: keep its first bytes for the next block.
            if not self.eof and e.reason == "unexpected end of data" and len(raw) - e.start < 4:
                self.text += raw[: e.start].decode("utf-8")
                self.carry = raw[e.start:]
            else:
                raise _FileProblem(_utf8_problem(raw, e, self.byte_offset, self.lines_before)) from None
        consumed = len(raw) - len(self.carry)
        self.lines_before += raw.count(b"\n", 0, consumed)
        self.byte_offset += consumed

    def more(self, at_least: int = 0) -> bool:
        """Read another block (at least `at_least` bytes); False at the end of the file."""
        if self.eof:
            return False
        raw = self.reader.read(max(self.block, at_least))
        self.eof = not raw
        self._feed(raw)
        return not self.eof or bool(raw)

    def drop(self, pos: int) -> None:
        """Forget text before pos (already parsed), keeping line/column numbers right."""
        newline = self.text.rfind("\n", 0, pos)
        if newline >= 0:
            self.dropped_lines += self.text.count("\n", 0, pos)
            self.column_base = pos - newline - 1
        else:
            self.column_base += pos
        self.text = self.text[pos:]

    def where(self, pos: int) -> str:
        newline = self.text.rfind("\n", 0, pos)
        line = 1 + self.dropped_lines + self.text.count("\n", 0, pos)
        column = pos - newline if newline >= 0 else self.column_base + pos + 1
        return f"line {line} column {column}"


def _array_chunks(path: str, reader: _Reader, raw: bytes, start: int, eof: bool, chunk_bytes: int,
                  chunk_records: int) -> Iterator[Chunk]:
    """A JSON array, parsed one record at a time (json's raw_decode), so memory holds one chunk of records."""
    text = _Text(reader, raw, start, eof, chunk_bytes)
    del raw
    pos = text.text.index("[") + 1
    records: Records = []
    index = 0

    def skip_space(at: int) -> int:
        while True:
            while at < len(text.text) and text.text[at] in " \t\r\n":
                at += 1
            if at < len(text.text) or not text.more():
                return at

    def fail(message: str, at: int) -> _FileProblem:
        return _FileProblem(f"is not valid JSON: {message} at {text.where(at)}")

    value_next = True  # at the start, and after each comma
    while True:
        pos = skip_space(pos)
        if pos >= len(text.text):
            raise fail("Expecting value" if value_next else "Expecting ',' delimiter", pos)
        if text.text[pos] == "]" and (index == 0 or not value_next):
            pos = skip_space(pos + 1)
            if pos < len(text.text):
                raise fail("Extra data", pos)
            break
        if not value_next:
            if text.text[pos] != ",":
                raise fail("Expecting ',' delimiter", pos)
            pos, value_next = pos + 1, True
            continue
        _DUPLICATES.found.clear()
        try:
            value, end = _DECODER.raw_decode(text.text, pos)
            if end == len(text.text) and text.more():  # a value that may go on in the next block: parse it again
                continue
        except json.JSONDecodeError as e:
            # Errors of a value cut at the end of the buffer point at its last few characters (or at the start of
            # an unterminated string): read on and parse again. Anything earlier is a real syntax error.
            truncated = e.msg.startswith("Unterminated string") or e.pos >= len(text.text) - 8
            if truncated and text.more(at_least=len(text.text)):
                continue
            raise fail(_json_error(e), e.pos) from None
        except RecursionError:
            raise _FileProblem(f"is not usable: record {index} is nested too deeply to read") from None
        records.append((f"record {index}", _checked(value, text.text[pos:end])))
        index, pos, value_next = index + 1, end, False
        if len(records) >= chunk_records:
            yield Chunk(path, size=reader.progress(), records=records)
            records = []
        if pos > chunk_bytes and 2 * pos > len(text.text):  # each drop copies at most as much as it frees
            text.drop(pos)
            pos = 0
    if records or index == 0:
        yield Chunk(path, size=reader.progress(), records=records)


def _parquet_chunks(path: str, chunk_records: int) -> Iterator[Chunk]:
    import pyarrow as pa  # imported here: only Parquet users pay for it
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        size, total, index = os.path.getsize(path), max(parquet.metadata.num_rows, 1), 0
        batches = parquet.iter_batches(batch_size=chunk_records)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            rows = batch.to_pylist()
            yield Chunk(path, size=size * len(rows) // total,
                        records=[(f"record {index + i}", row) for i, row in enumerate(rows)])
            index += len(rows)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise _FileProblem(f"cannot be read as Parquet: {e}") from None


def _saved_dataset_chunks(path: str, chunk_records: int) -> Iterator[Chunk]:
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
    size = sources_size([(path, "saved")])
    for start in range(0, len(dataset), chunk_records):
        rows = dataset.select(range(start, min(start + chunk_records, len(dataset)))).to_list()
        yield Chunk(path, size=size * len(rows) // max(len(dataset), 1),
                    records=[(f"record {start + i}", row) for i, row in enumerate(rows)])
    if not len(dataset):
        yield Chunk(path, size=size, records=[])


def source_chunks(path: str, kind: str, chunk_bytes: int | None = None, chunk_records: int | None = None
                  ) -> Iterator[Chunk]:
    """The chunks of one source (a file, or a save_to_disk directory). Raises _FileProblem."""
    chunk_bytes, chunk_records = chunk_bytes or CHUNK_BYTES, chunk_records or CHUNK_RECORDS
    if kind == "saved":
        return _saved_dataset_chunks(path, chunk_records)
    if path.lower().endswith(".parquet"):
        return _parquet_chunks(path, chunk_records)
    return _json_chunks(path, chunk_bytes, chunk_records)  # .json, .jsonl, .gz or anything else: decided by content


# --------------------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------------------


def _split_paths(data_path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """One path, "a.json,b.jsonl", or a list of paths (list items are not split on commas). A path that exists as
    given is not split, so file names with commas work."""
    if isinstance(data_path, (str, os.PathLike)):
        whole = os.fspath(data_path)
        items = [whole] if os.path.lexists(whole.strip()) else whole.split(",")
    else:
        items = [os.fspath(p) for p in data_path]
    return [item.strip() for item in items if item.strip()]


def _missing(path: str) -> str:
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        if e.errno == errno.ENOENT:
            return "does not exist"
        return _os_problem(e, "be accessed")
    return "does not exist"


def _is_data_file(name: str) -> bool:
    return name.lower().endswith(DATA_EXTENSIONS)


def source_files(path: str, kind: str) -> list[Path]:
    """The files on disk behind one source: the file itself, or every file of a save_to_disk directory."""
    return sorted(f for f in Path(path).rglob("*") if f.is_file()) if kind == "saved" else [Path(path)]


def sources_size(items: Sequence[tuple[str, str]]) -> int:
    """Bytes on disk of (path, kind) sources: what reading them means, for progress bars."""
    return sum(f.stat().st_size for path, kind in items for f in source_files(path, kind))


@dataclass
class Sources:
    """What a --data_path names: the sources to read (path, kind "file" | "saved"), path-level problems, and the
    entries of given directories that are not read (listed in the report)."""

    items: list[tuple[str, str]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return [path for path, _ in self.items]


def _expand_directory(path: str, out: Sources) -> None:
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        out.problems.append(Problem(path, "", "", _os_problem(e, "be listed")))
        return
    if any(marker in names for marker in _SAVE_TO_DISK_MARKERS):
        out.items.append((path, "saved"))
        return
    found = []
    for name in names:
        full = os.path.join(path, name)
        # Hidden files are left out: editors and macOS ("._train.json") leave non-data files with data extensions.
        if _is_data_file(name) and not name.startswith(".") and os.path.isfile(full):
            found.append(full)
        else:
            kind = ("directory, not searched" if os.path.isdir(full) else "hidden" if name.startswith(".")
                    else "broken link" if not os.path.exists(full) else "not a data file")
            out.ignored.append(f"{full} ({kind})")
    if not found:
        message = (f"is a directory without {', '.join(DATA_EXTENSIONS[:-1])} or {DATA_EXTENSIONS[-1]} files "
                   "(subdirectories are not searched)")
        out.problems.append(Problem(path, "", "", message))
    out.items += [(full, "file") for full in found]


def expand_sources(data_path: str | os.PathLike | Sequence[str | os.PathLike]) -> Sources:
    paths = _split_paths(data_path)
    if not paths:
        raise DataError("No data path given; pass a file, a directory, or several files separated by commas.")
    out = Sources()
    for path in paths:
        if not os.path.exists(path):
            out.problems.append(Problem(path, "", "", _missing(path)))
        elif os.path.isdir(path):
            _expand_directory(path, out)
        else:
            out.items.append((path, "file"))
    seen: dict[str, str] = {}
    for path, _ in out.items:
        real = os.path.realpath(path)
        if real in seen:
            out.problems.append(Problem(path, "", "", f"is the same file as {seen[real]}, given twice (it would be "
                                        "trained twice); give each file once"))
        seen.setdefault(real, path)
    return out


# --------------------------------------------------------------------------------------------------------------
# Validating
# --------------------------------------------------------------------------------------------------------------


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@dataclass
class ProblemLog:
    """Problems in the order found: the first MAX_SHOWN_PROBLEMS kept, all counted, the files they are in listed."""

    shown: list[Problem] = field(default_factory=list)
    count: int = 0
    files: dict[str, None] = field(default_factory=dict)

    def add(self, problems: Sequence[Problem]) -> None:
        for problem in problems:
            self.count += 1
            self.files.setdefault(problem.file)
            if len(self.shown) < MAX_SHOWN_PROBLEMS:
                self.shown.append(problem)

    def merge(self, other: ProblemLog) -> None:
        self.shown += other.shown[: MAX_SHOWN_PROBLEMS - len(self.shown)]
        self.count += other.count
        self.files.update(other.files)

    def lines(self) -> list[str]:
        lines = [f"  {problem}" for problem in self.shown]
        if self.count > len(self.shown):
            lines.append(f"  ... and {self.count - len(self.shown)} more")
        return lines

    def file_names(self) -> str:
        names = list(self.files)
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more files" if len(names) > 5 else "")


@dataclass
class Validated:
    """One chunk, validated: its good conversations and what was wrong with the rest."""

    conversations: list[Conversation] = field(default_factory=list)
    records: int = 0
    bad_records: int = 0
    problems: ProblemLog = field(default_factory=ProblemLog)
    file_problem: Problem | None = None
    formats: dict[str, int] = field(default_factory=dict)


def validate_chunk(chunk: Chunk) -> Validated:
    out = Validated()
    try:
        records = chunk_records(chunk)
    except _FileProblem as e:
        out.file_problem = Problem(chunk.file, "", "", str(e))
        return out
    out.records = len(records)
    for where, record in records:
        if isinstance(record, _BadLine):
            conversation, problems = None, [Problem(chunk.file, where, "", record.message)]
        else:
            conversation, problems = normalize_record(record, file=chunk.file, where=where)
        if problems:
            out.bad_records += 1
            out.problems.add(problems)
        else:
            out.conversations.append(conversation)
            out.formats[conversation.format] = out.formats.get(conversation.format, 0) + 1
    return out


@dataclass
class Tally:
    """Running totals over all chunks of all sources."""

    file_problems: list[Problem] = field(default_factory=list)
    record_problems: ProblemLog = field(default_factory=ProblemLog)
    records: int = 0
    bad_records: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    @property
    def conversations(self) -> int:
        return self.records - self.bad_records

    def add(self, validated: Validated) -> None:
        problem = validated.file_problem
        if problem and all(p.file != problem.file for p in self.file_problems):  # one per file: its first
            self.file_problems.append(problem)
        self.records += validated.records
        self.bad_records += validated.bad_records
        self.record_problems.merge(validated.problems)
        for fmt, n in validated.formats.items():
            self.formats[fmt] = self.formats.get(fmt, 0) + n

    def error_message(self, skip_invalid: bool) -> str | None:
        sections = []
        if self.file_problems:
            head = f"Cannot use {_plural(len(self.file_problems), 'data path')}:"
            sections.append("\n".join([head, *(f"  {p}" for p in self.file_problems), _FILE_HINT]))
        if self.record_problems.count and not skip_invalid:
            head = (
                f"Found {_plural(self.record_problems.count, 'problem')} in {self.bad_records} of "
                f"{_plural(self.records, 'record')} ({self.record_problems.file_names()}):"
            )
            sections.append("\n".join([head, *self.record_problems.lines(), _SKIP_HINT]))
        return "\n\n".join(sections) or None

    def nothing_left_message(self, files: list[str]) -> str:
        names = ", ".join(files)
        if self.records == 0:
            return f"No records in {names}; there is nothing to train on."
        return "\n".join([
            f"No valid records in {names}: all {self.records} were invalid and skipped; nothing is left to train on.",
            *self.record_problems.lines(),
        ])


def read_sources(sources: Sources, tally: Tally) -> Iterator[Chunk]:
    """The chunks of every source in order; a file-level problem is noted in the tally (and ends that source)."""
    for path, kind in sources.items:
        try:
            yield from source_chunks(path, kind)
        except _FileProblem as e:
            if all(p.file != path for p in tally.file_problems):  # one per file: its first (a chunk may have one)
                tally.file_problems.append(Problem(path, "", "", str(e)))


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_conversations(
    data_path: str | os.PathLike | Sequence[str | os.PathLike], *, skip_invalid: bool = False
) -> LoadResult:
    """Read every record of every file, validate all of them, and return the normalized conversations.

    Raises DataError listing the problems (first MAX_SHOWN_PROBLEMS of them) when any record is invalid, unless
    skip_invalid, which drops those records instead. Unreadable files always raise. Holds every conversation in
    memory: for calibration sets and tests; training streams its data (chattune.stream).
    """
    sources = expand_sources(data_path)
    tally = Tally(file_problems=list(sources.problems))
    conversations: list[Conversation] = []
    for chunk in read_sources(sources, tally):
        validated = validate_chunk(chunk)
        tally.add(validated)
        conversations += validated.conversations
    message = tally.error_message(skip_invalid)
    if message:
        raise DataError(message)
    if not conversations:
        raise DataError(tally.nothing_left_message(sources.files))
    return LoadResult(
        conversations=conversations,
        files=sources.files,
        skipped=tally.record_problems.shown if skip_invalid else [],
        skipped_records=tally.bad_records,
        format_counts=tally.formats,
        ignored=sources.ignored,
    )
