"""Tool calls and reasoning read back from an answer, in the formats the chat templates write them (what a serving
engine's parsers read, with `--tool-call-parser qwen3_coder|hermes --reasoning-parser qwen3` in vLLM):

* Qwen3.5 / 3.6 / 3.8 (qwen3_coder): `<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n...
  </function>\\n</tool_call>`; a value is typed by the tool's schema: a string stays as written (less the newline on
  each side), anything else is read as JSON.
* Qwen2.5 / Qwen3 (hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.
* reasoning: `<think>...</think>` before the answer (qwen3).

The deploy check uses them where vLLM is not installed, to show that what training taught the model to write is
what serving will read back.
"""

from __future__ import annotations

import json
import re
from typing import Any

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, the rest) of an answer: the text before `</think>` (without `<think>`), or None without one."""
    if "</think>" not in text:
        return None, text
    reasoning, rest = text.split("</think>", 1)
    return reasoning.replace("<think>", "", 1).strip(), rest.strip()


def _schema_types(tools: list[dict]) -> dict[str, dict[str, str]]:
    out = {}
    for tool in tools:
        function = tool.get("function", tool)
        props = (function.get("parameters") or {}).get("properties") or {}
        out[function.get("name", "")] = {name: str(spec.get("type", "string")) for name, spec in props.items()}
    return out


def _typed(value: str, kind: str) -> Any:
    value = value[1:] if value.startswith("\n") else value
    value = value[:-1] if value.endswith("\n") else value
    if kind == "string":
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def parse_tool_calls(text: str, tools: list[dict]) -> list[dict[str, Any]]:
    """Every call in `text` as {"name", "arguments"}, in order, whichever of the two formats it is written in."""
    types = _schema_types(tools)
    calls = []
    for body in _CALL.findall(text):
        function = _FUNCTION.search(body)
        if function is not None:
            name = function.group(1).strip()
            kinds = types.get(name, {})
            arguments = {p.strip(): _typed(v, kinds.get(p.strip(), "string"))
                         for p, v in _PARAMETER.findall(function.group(2))}
            calls.append({"name": name, "arguments": arguments})
            continue
        try:
            call = json.loads(body.strip())
        except ValueError:
            calls.append({"name": None, "arguments": body.strip()})
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({"name": call.get("name"), "arguments": json.loads(arguments) if isinstance(arguments, str)
                      else arguments})
    return calls
