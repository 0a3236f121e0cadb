"""One data record -> a validated Conversation (chat messages), or every problem of the record.

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
(`source_chunks`), so training can stream data of any size (chattune.data.prepare).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chattune.data.problems import (
    Problem,
    RecordProblems,
    plural,
    show,
    string_problem,
    type_name,
)
from chattune.data.tools import (
    check_calls,
    parse_tool_calls,
    parse_tools,
    sharegpt_call,
)

_KNOWN_FORMATS = "expected `conversations` (ShareGPT), `messages` (OpenAI) or `instruction`/`output` (Alpaca)"
_ALTERNATION = "after the optional system turn, turns must alternate user, assistant, starting with user"


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]  # {"role", "content"} (+ "reasoning_content", "tool_calls", tool "name"/"tool_call_id")
    source: str  # "train.json: record 12", for error messages later on
    format: str  # "sharegpt" | "messages" | "alpaca"
    tools: tuple[dict, ...] = ()  # {"type": "function", "function": {"name", "description", "parameters"}}
    masked: tuple[int, ...] = ()  # indices of assistant messages the data marks as not trained (train: false, ...)
    # A preference pair (chattune.data.pairs): messages end with the chosen final assistant message, and this is the
    # rejected one, which continues the same prompt (messages[:-1]); None for supervised conversations.
    rejected: dict | None = None


# --------------------------------------------------------------------------------------------------------------
# Record normalization
# --------------------------------------------------------------------------------------------------------------


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
    {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "function": "tool"},
)  # "function": the result turn of OpenAI's legacy `function_call` API


def _reply_problem(text: str) -> str | None:
    """An empty reply would train the model to answer with nothing."""
    if text.strip():
        return None
    kind = "is empty" if text == "" else "is whitespace only"
    return f"{kind}; an assistant turn needs a non-empty reply"


def _parse_role(turn: dict, path: str, spec: _TurnFormat, out: RecordProblems) -> str | None:
    """Canonical role of a turn, or None (problem reported) when it is missing or unknown."""
    role_path = f"{path}.{spec.role_key}"
    if spec.role_key not in turn or turn[spec.role_key] is None:
        state = "is missing" if spec.role_key not in turn else "is null"
        out.add(role_path, f"{state}; expected one of {spec.accepted}")
        return None
    raw = turn[spec.role_key]
    if not isinstance(raw, str):
        out.add(role_path, f"must be a string, got {type_name(raw)}; expected one of {spec.accepted}")
        return None
    if raw not in spec.roles:
        out.add(role_path, f"= {show(raw)}; expected one of {spec.accepted}")
        return None
    return spec.roles[raw]


def _parse_turn(turn: object, path: str, spec: _TurnFormat, out: RecordProblems) -> tuple[str | None, dict | None]:
    """(canonical role or None, message dict or None) of one turn; problems go to `out`."""
    if not isinstance(turn, dict):
        example = f'{{"{spec.role_key}": ..., "{spec.content_key}": ...}}'
        out.add(path, f"must be an object like {example}, got {type_name(turn)}")
        return None, None
    role = _parse_role(turn, path, spec, out)
    if spec is _SHAREGPT and turn.get(spec.role_key) == "function_call":
        message = sharegpt_call(turn.get(spec.content_key), f"{path}.{spec.content_key}", out)
    else:
        message = _turn_content(turn, role, path, spec, out)
    if message is not None and spec is _MESSAGES:
        _add_message_extras(turn, role, path, message, out)
    if message is not None and role == "assistant":
        message["__train__"] = _train_flag(turn, path, out)
    elif role is not None:
        _no_train_flag(turn, role, path, out)
    return role, (None if role is None else message)


def _turn_content(turn: dict, role: str | None, path: str, spec: _TurnFormat, out: RecordProblems) -> dict | None:
    content = turn.get(spec.content_key)
    content_path = f"{path}.{spec.content_key}"
    calls = _calls_of(turn) if spec is _MESSAGES and role == "assistant" else None
    if calls is not None and (content is None or content == ""):  # a call with no text: content may be null
        return {"role": role, "content": ""}
    problem = string_problem(content, spec.content_key not in turn)
    if isinstance(content, list):  # OpenAI multimodal parts: say why a list is refused
        problem += " (content parts are not supported; join them into one string)"
    if problem is None and role == "assistant" and calls is None:
        problem = _reply_problem(content)
    if problem:
        out.add(content_path, problem)
        return None
    return {"role": role, "content": content}


def _add_message_extras(turn: dict, role: str | None, path: str, message: dict, out: RecordProblems) -> None:
    """reasoning_content and tool_calls of assistant messages; name and tool_call_id of tool messages."""
    if turn.get("reasoning_content") is not None:
        _add_reasoning(turn["reasoning_content"], role, f"{path}.reasoning_content", message, out)
    key = "tool_calls" if turn.get("tool_calls") is not None else "function_call"
    if _calls_of(turn) is not None:
        if role != "assistant":
            out.add(f"{path}.{key}", f"is only allowed on assistant messages, not on a {role} message")
        else:
            before = len(out.items)
            message["tool_calls"] = parse_tool_calls(_calls_of(turn), f"{path}.{key}", out)
            if len(out.items) > before:  # a call was refused: its results are not judged against the rest
                message["__calls_refused__"] = True
    if role == "tool":
        for key in ("name", "tool_call_id"):
            value = turn.get(key)
            if value is not None and not isinstance(value, str):
                out.add(f"{path}.{key}", f"must be a string, got {type_name(value)}")
            elif value is not None:
                message[key] = value


def _calls_of(turn: dict) -> list | None:
    """The tool calls of a message: `tool_calls`, or OpenAI's legacy single `function_call` {"name", "arguments"}."""
    if turn.get("tool_calls") is not None:
        return turn["tool_calls"]
    legacy = turn.get("function_call")
    return None if legacy is None else [legacy] if isinstance(legacy, dict) else legacy


def _add_reasoning(reasoning: object, role: str | None, path: str, message: dict, out: RecordProblems) -> None:
    if not isinstance(reasoning, str):
        out.add(path, f"must be a string, got {type_name(reasoning)}")
    elif role is not None and role != "assistant":
        out.add(path, f"is only allowed on assistant messages, not on a {role} message")
    else:
        message["reasoning_content"] = reasoning


# --------------------------------------------------------------------------------------------------------------
# What is trained, per message (tool calls and their results: chattune.data.tools)
# --------------------------------------------------------------------------------------------------------------

_TRAIN_KEYS = ("train", "loss", "weight")  # conventions of peer tools: train/loss booleans, weight 0 or 1


def _train_flag(turn: dict, path: str, out: RecordProblems) -> bool:
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
            out.add(f"{path}.{key}", f"must be true or false, got {type_name(value)}")
        else:
            trained = trained and value
    return trained


def _no_train_flag(turn: dict, role: str, path: str, out: RecordProblems) -> None:
    for key in _TRAIN_KEYS:
        if turn.get(key) is not None:
            out.add(f"{path}.{key}", f"is only meaningful on assistant turns (a {role} turn is never trained)")


def _check_order(turns: list, roles: list[str | None], messages: list[dict | None], spec: _TurnFormat,
                 top_system: bool, out: RecordProblems) -> None:
    """System placement, user/assistant alternation (tool results after the calling assistant turn) and the final
    assistant turn."""

    def bad_role(i: int, message: str) -> None:  # formats lazily: the common, valid case never pays for it
        out.add(f"{spec.list_key}[{i}].{spec.role_key}", f"= {show(turns[i][spec.role_key])}; {message}")

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


def _top_level_system(record: dict, out: RecordProblems) -> str | None:
    """Optional `system` string of ShareGPT / Alpaca records; "" and null mean none (common in exported data)."""
    system = record.get("system")
    if system is None or system == "":
        return None
    if not isinstance(system, str):
        out.add("system", f"must be a string, got {type_name(system)}")
        return None
    return system


def _turn_messages(record: dict, spec: _TurnFormat, out: RecordProblems, tools: list[dict]) -> list[dict]:
    turns = record[spec.list_key]
    if not isinstance(turns, list):
        out.add(spec.list_key, f"must be a list of turns, got {type_name(turns)}")
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
    check_calls(messages, tools, spec.list_key, spec is _MESSAGES, out)
    # Report in turn order, so the problems of one turn sit together, whichever check found them.
    out.items[first_problem:] = sorted(out.items[first_problem:], key=lambda p: _turn_index(p.field, spec.list_key))
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + messages


def _turn_index(field_path: str, list_key: str) -> float:
    """Sort key of a problem: "system" first, then "list[i]..." by i, then problems of the whole list."""
    if not field_path.startswith(list_key + "["):
        return -1 if field_path == "system" else float("inf")
    return int(field_path[len(list_key) + 1 : field_path.index("]")])


def _sharegpt_messages(record: dict, out: RecordProblems, tools: list[dict]) -> list[dict]:
    return _turn_messages(record, _SHAREGPT, out, tools)


def _openai_messages(record: dict, out: RecordProblems, tools: list[dict]) -> list[dict]:
    return _turn_messages(record, _MESSAGES, out, tools)


def _alpaca_string(record: dict, key: str, out: RecordProblems, *, required: bool, expected: str) -> str | None:
    value = record.get(key)
    if not required and value is None:
        return None
    problem = string_problem(value, key not in record, expected)
    if problem:
        out.add(key, problem)
        return None
    return value


def _alpaca_history(record: dict, out: RecordProblems) -> list[dict]:
    history = record.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        out.add("history", f"must be a list of [user, assistant] pairs, got {type_name(history)}")
        return []
    messages = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            got = f"a list of {plural(len(pair), 'item')}" if isinstance(pair, list) else type_name(pair)
            out.add(f"history[{i}]", f"must be a [user, assistant] pair of strings, got {got}")
            continue
        for j, role in enumerate(("user", "assistant")):
            problem = string_problem(pair[j], False)
            if problem is None and role == "assistant":
                problem = _reply_problem(pair[j])
            if problem:
                out.add(f"history[{i}][{j}]", problem)
            messages.append({"role": role, "content": pair[j]})
    return messages


def _alpaca_messages(record: dict, out: RecordProblems, tools: list[dict]) -> list[dict]:
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
_BUILDERS: dict[str, Callable[[dict, RecordProblems, list[dict]], list[dict]]] = {
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
        name = type_name(record)
        article = "" if name == "null" else "an " if name[0] in "aeiou" else "a "
        what = f"{article}{name}, not a JSON object"
    elif not record:
        what = "an empty object"
    else:
        keys = [str(key) if len(str(key)) <= 40 else show(str(key)) for key in record]  # a key can be megabytes
        what = "keys: " + ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "")
    return f"record of no known format ({what}); {_KNOWN_FORMATS}"


def normalize_record(record: object, *, file: str, where: str) -> tuple[Conversation | None, list[Problem]]:
    """Validate one record and turn it into a Conversation; returns (None, problems) when anything is wrong."""
    out = RecordProblems(file, where)
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
    tools = parse_tools(record, out)  # Alpaca records carry them too: the prompt renders them
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
        return (f"a preference pair (`chosen`/`rejected`, DPO-style data); {_NOT_SFT}: pass --stage dpo to train "
                "on preference pairs, or train on the chosen conversations as `messages`")
    if isinstance(record.get("label"), bool):
        return (f"KTO data (`label` marks whether the answer is one to imitate or not); {_NOT_SFT}: keep only the "
                "records with label true (and drop the field), or use a KTO trainer")
    media = [key for key in ("images", "videos", "audios", "image", "video", "audio") if record.get(key)]
    if media or _mentions_media(record):
        what = ", ".join(f"`{m}`" for m in media) or "a user turn that starts with an image/video placeholder"
        return (f"a multimodal record ({what}); this tool trains text-only chat models, and would train the "
                "placeholders as literal text: remove the media from the data, or use a vision-language trainer")
    return None


def _mentions_media(record: dict) -> bool:
    """A user turn that starts with a media placeholder (LLaVA's "<image>\n..."), as multimodal data stripped of its
    media field looks. A tag inside the text is text: chat about HTML's <video> element is not multimodal."""
    turns = record.get("messages") or record.get("conversations")
    if not isinstance(turns, list):
        return False
    texts = [t.get("content", t.get("value")) for t in turns
             if isinstance(t, dict) and t.get("role", t.get("from")) in ("user", "human")]
    return any(isinstance(text, str) and text.lstrip().startswith(_MEDIA_TAGS) for text in texts)


# --------------------------------------------------------------------------------------------------------------
# Reading files, in bounded chunks
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Validating
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
