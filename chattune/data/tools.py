"""Tool calling in records: OpenAI `tool_calls` and `tools`, and ShareGPT `function_call` turns as LLaMA-Factory and
glaive write them, normalized to the form chat templates read."""

from __future__ import annotations

import json
import math

from chattune.data.problems import RecordProblems, show, type_name


def parse_tool_calls(calls: object, path: str, out: RecordProblems) -> list[dict]:
    """OpenAI `tool_calls` in the form chat templates read: {"type": "function", "function": {"name", "arguments":
    an object}} (a JSON-string `arguments` is parsed; an `id` is kept)."""
    if not isinstance(calls, list) or not calls:
        out.add(path, f"must be a non-empty list of calls, got {type_name(calls) if calls != [] else 'an empty list'}")
        return []
    parsed = []
    for i, call in enumerate(calls):
        where = f"{path}[{i}]"
        if not isinstance(call, dict):
            out.add(where, f'must be an object like {{"type": "function", "function": {{"name": ..., "arguments": '
                           f'...}}}}, got {type_name(call)}')
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


def _call_name(function: object, path: str, out: RecordProblems) -> str | None:
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        out.add(path, "is missing; a tool call needs the name of the function it calls")
        return None
    return name


def _call_arguments(function: dict, path: str, out: RecordProblems) -> dict | None:
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            out.add(path, f"is not valid JSON ({e.msg} at column {e.colno}): {show(arguments)}")
            return None
    if not isinstance(arguments, dict):
        out.add(path, f"must be a JSON object of arguments, got {type_name(arguments)}")
        return None
    if not _finite(arguments):  # Python's json reads them; the template would render a call no JSON parser reads
        out.add(path, "holds NaN or Infinity, which JSON does not have (the trained call would not parse): use null "
                      "or a number")
        return None
    return arguments


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def sharegpt_call(value: object, path: str, out: RecordProblems) -> dict | None:
    """A ShareGPT `function_call` turn: the assistant's call(s) as a JSON string {"name", "arguments"} (or a list)."""
    if not isinstance(value, str):
        out.add(path, f"must be a JSON string of the call, got {type_name(value)}")
        return None
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as e:
        out.add(path, f'is not valid JSON ({e.msg} at column {e.colno}); expected {{"name": ..., "arguments": ...}}')
        return None
    calls = calls if isinstance(calls, list) else [calls]
    parsed = parse_tool_calls(calls, path, out)
    return {"role": "assistant", "content": "", "tool_calls": parsed} if parsed else None


def parse_tools(record: dict, out: RecordProblems) -> list[dict]:
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
        out.add("tools", f"must be a list of function schemas, got {type_name(tools)}")
        return []
    wrapped = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            out.add(f"tools[{i}]", 'must be a function schema with a "name" (and "description", "parameters")')
            continue
        wrapped.append({"type": "function", "function": function})
    return wrapped


def check_calls(messages: list[dict | None], tools: list[dict], list_key: str, per_call: bool, out: RecordProblems
                ) -> None:
    """Every call names a declared tool; every tool result answers a call of the assistant turn before it (by id,
    where the data gives ids), and every call gets its result before the next assistant turn. `messages` are a
    record's parsed turns (None: a turn with its own problem), at `list_key`; `per_call`: problems name the call."""
    declared = [t["function"]["name"] for t in tools]
    pending: int | None = 0  # calls of the last assistant message not yet answered (None: unknown, turn invalid)
    caller, ids, answered = 0, [], set()  # the calling message, its call ids, the ids answered so far
    for i, message in enumerate(messages):
        if message is None:
            pending = None  # its problem is reported; the tool results after it are not judged
            continue
        refused = message.pop("__calls_refused__", False)  # a call of it was refused: the same
        for j, call in enumerate(message.get("tool_calls", [])):
            name = call["function"]["name"]
            if name not in declared:
                known = f"declared: {', '.join(declared)}" if declared else "the record declares no `tools`"
                out.add(f"{list_key}[{i}]" + (f".tool_calls[{j}]" if per_call else ""),
                        f"calls {show(name)}, which is not a declared tool ({known})")
        if message["role"] == "tool":
            if pending == 0:
                out.add(f"{list_key}[{i}]", "is a tool result with no tool call before it to answer")
            elif pending is not None:
                _check_call_id(message.get("tool_call_id"), ids, answered, f"{list_key}[{i}].tool_call_id", out)
            pending = None if pending is None else max(0, pending - 1)
        else:
            if pending and message["role"] == "assistant":  # calls left unanswered (a user turn there: _check_order)
                out.add(f"{list_key}[{caller}]", f"makes {len(ids)} tool call(s) and {pending} of them get no "
                        "tool result before the next turn: add the results, or drop the unanswered calls")
            calls = message.get("tool_calls", [])
            pending, caller, ids, answered = None if refused else len(calls), i, [c.get("id") for c in calls], set()


def _check_call_id(call_id: object, ids: list, answered: set, path: str, out: RecordProblems) -> None:
    """A tool result's `tool_call_id` names one of the calls it follows, once (where the data gives ids)."""
    if not isinstance(call_id, str) or not any(ids):
        return
    if call_id not in ids:
        out.add(path, f"= {show(call_id)} answers none of the calls before it "
                      f"({', '.join(show(x) for x in ids if x)}): fix the id")
    elif call_id in answered:
        out.add(path, f"= {show(call_id)} answers a call that already has its result")
    answered.add(call_id)
