"""The deploy check's read-back of tool calls and reasoning (chattune.export.toolparse) on the published templates."""

import pytest
from test_real_templates import PARALLEL, SEARCH, TOOL_CALLING, WEATHER, tokenizer

from chattune.data.records import normalize_record
from chattune.export.deploy import check_parse
from chattune.export.toolparse import parse_tool_calls, split_reasoning


def test_qwen35_xml_calls_are_typed_by_the_schema():
    text = ("<tool_call>\n<function=search>\n<parameter=query>\numbrella\n  or coat?\n</parameter>\n"
            "<parameter=limit>\n3\n</parameter>\n</function>\n</tool_call>")
    assert parse_tool_calls(text, [SEARCH]) == [{"name": "search", "arguments": {"query": "umbrella\n  or coat?",
                                                                               "limit": 3}}]
    assert split_reasoning("<think>\nplan it\n</think>\n\nDone.") == ("plan it", "Done.")
    assert split_reasoning("Done.") == (None, "Done.")


@pytest.mark.parametrize("family, messages, tools", [("qwen3_5", PARALLEL, [WEATHER, SEARCH]),
                                                     ("qwen3_8", PARALLEL, [WEATHER, SEARCH]),
                                                     ("qwen2_5", TOOL_CALLING, [WEATHER])])
def test_every_call_and_reasoning_is_read_back_as_the_data_has_it(family, messages, tools):
    tok, _ = tokenizer(family)
    conversation, problems = normalize_record({"messages": messages, "tools": tools}, file="t.jsonl", where="line 1")
    assert not problems
    check = check_parse([conversation], tok)
    assert check.passed and check.values["turns"] == (1 if family == "qwen2_5" else 2), check.detail


def test_a_template_that_writes_calls_differently_fails_the_read_back():
    tok, _ = tokenizer("qwen3_5")
    tok.chat_template = tok.chat_template.replace("<parameter=", "<param=")  # a parser would not find the values
    conversation, _ = normalize_record({"messages": PARALLEL, "tools": [WEATHER, SEARCH]}, file="t.jsonl",
                                       where="line 1")
    check = check_parse([conversation], tok)
    assert not check.passed and "tool calls read back as" in check.detail
