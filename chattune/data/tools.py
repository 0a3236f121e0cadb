"""Tool calling in records: OpenAI `tool_calls` and `tools`, and ShareGPT `function_call` turns as LLaMA-Factory and
glaive write them, normalized to the form chat templates read."""

from __future__ import annotations

import json

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
        return value == value and value not in (float("inf"), float("-inf"))
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
