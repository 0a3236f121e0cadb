"""Tests for chattune.data.pairs: preference records of every layout -> Conversation with `rejected`, the canonical
pair record and its round trip, and the problems of bad pairs."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from chattune.data.pairs import normalize_pair, pair_record
from chattune.data.records import Conversation

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather of a city", "parameters": CITY}}]
CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
PROMPT = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
    {"role": "assistant", "content": "3 degrees.", "train": False},
    {"role": "user", "content": "Coat?"},
]
CHOSEN = {"role": "assistant", "content": "Yes, a warm one.", "reasoning_content": "3 degrees is cold."}
REJECTED = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
    "name": "weather", "arguments": {"city": "Oslo"}}}]}  # a final tool call: empty content is fine

PROMPT_MESSAGES = (
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
    {"role": "assistant", "content": "3 degrees."},
    {"role": "user", "content": "Coat?"},
)
REJECTED_MESSAGE = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]}


def expected(fmt: str) -> Conversation:
    return Conversation(messages=(*PROMPT_MESSAGES, CHOSEN), source="pairs.json: record 3", format=fmt,
                        tools=tuple(TOOLS), masked=(2, 4), rejected=REJECTED_MESSAGE)


def pair_of(record) -> Conversation:
    conversation, problems = normalize_pair(record, file="pairs.json", where="record 3")
    assert problems == []
    return conversation


def problems_of(record) -> list[str]:
    conversation, problems = normalize_pair(record, file="train.json", where="record 12")
    assert conversation is None
    return [str(problem) for problem in problems]


# ----------------------------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------------------------

WHOLE = {"chosen": [*PROMPT, CHOSEN], "rejected": [*copy.deepcopy(PROMPT), REJECTED], "tools": TOOLS}
EXPLICIT = {"prompt": PROMPT, "chosen": [CHOSEN], "rejected": REJECTED, "tools": TOOLS}
LLAMA_FACTORY_MESSAGES = {"messages": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "tools": json.dumps(TOOLS)}
SHAREGPT = {
    "system": "Use tools.",
    "tools": json.dumps([TOOLS[0]["function"]]),  # as LLaMA-Factory writes them: a JSON string of bare schemas
    "conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": '{"temp": 3}'},
        {"from": "gpt", "value": "3 degrees."},
        {"from": "human", "value": "And Bergen?"},
    ],
    "chosen": {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Bergen"}})},
    "rejected": {"from": "gpt", "value": "Also 3 degrees."},
}
ALPACA = {"system": "Be brief.", "tools": TOOLS, "history": [["Hi", "Hello!"]], "instruction": "Translate:",
          "input": "Guten Tag", "chosen": "Good day", "rejected": "Good night"}
PLAIN = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
ULTRAFEEDBACK = {
    "prompt": "2+2?", "prompt_id": "ab12", "score_chosen": 9.0, "score_rejected": 2.0,
    "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
    "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],  # a copy of chosen
}


def test_whole_conversations():
    assert pair_of(WHOLE) == expected("pairs-messages")


def test_prompt_plus_completions():
    assert pair_of(EXPLICIT) == expected("pairs-prompt")


def test_llama_factory_with_openai_keys():
    assert pair_of(LLAMA_FACTORY_MESSAGES) == expected("pairs-sharegpt")


def test_sharegpt():
    calls = [{"type": "function", "function": {"name": "weather", "arguments": {"city": city}}}
             for city in ("Oslo", "Bergen")]
    assert pair_of(SHAREGPT) == Conversation(
        messages=(
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": calls[:1]},
            {"role": "tool", "content": '{"temp": 3}'},
            {"role": "assistant", "content": "3 degrees."},
            {"role": "user", "content": "And Bergen?"},
            {"role": "assistant", "content": "", "tool_calls": calls[1:]},
        ),
        source="pairs.json: record 3", format="pairs-sharegpt", tools=tuple(TOOLS), masked=(2, 4),
        rejected={"role": "assistant", "content": "Also 3 degrees."},
    )


def test_alpaca():
    assert pair_of(ALPACA) == Conversation(
        messages=(
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Translate:\nGuten Tag"},
            {"role": "assistant", "content": "Good day"},
        ),
        source="pairs.json: record 3", format="pairs-alpaca", tools=tuple(TOOLS), masked=(2,),
        rejected={"role": "assistant", "content": "Good night"},
    )


@pytest.mark.parametrize("record", [PLAIN, ULTRAFEEDBACK], ids=["plain text", "ultrafeedback"])
def test_text_prompt(record):
    assert pair_of(record) == Conversation(
        messages=({"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}),
        source="pairs.json: record 3", format="pairs-prompt", rejected={"role": "assistant", "content": "5"},
    )


def test_answers_differing_only_in_reasoning_are_a_pair():
    record = {"prompt": "2+2?", "chosen": {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"},
              "rejected": {"role": "assistant", "content": "4", "reasoning_content": "guess"}}
    assert pair_of(record).rejected == {"role": "assistant", "content": "4", "reasoning_content": "guess"}


def test_parquet_nulls_count_as_absent():
    record = {"prompt": PLAIN["prompt"], "chosen": "4", "rejected": "5", "messages": None, "conversations": None,
              "instruction": None, "tools": None, "system": None}
    assert pair_of(record) == pair_of(PLAIN)


@pytest.mark.parametrize("record", [WHOLE, EXPLICIT, LLAMA_FACTORY_MESSAGES, SHAREGPT, ALPACA, PLAIN, ULTRAFEEDBACK],
                         ids=["whole", "explicit", "llama-factory-messages", "sharegpt", "alpaca", "plain",
                              "ultrafeedback"])
def test_pair_record_reads_back_to_the_same_conversation(record):
    """The canonical record keeps tools, tool calls, reasoning and the masked prompt turns; its layout is TRL's
    explicit prompt, so only `format` changes."""
    original = pair_of(record)
    canonical = pair_record(original)
    assert set(canonical) <= {"prompt", "chosen", "rejected", "tools"}
    again = dataclasses.replace(original, format="pairs-prompt")
    assert pair_of(canonical) == again
    assert pair_of(json.loads(json.dumps(canonical))) == again
    assert "tools" in canonical if original.tools else "tools" not in canonical


# ----------------------------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------------------------

P = "train.json: record 12: "
PAIR_FORMATS = ("expected a preference pair: `chosen` and `rejected`, with `prompt`, `conversations`, `messages` or "
                "`instruction` (or whole conversations as chosen/rejected)")
SAME_PROMPT = ("a pair's chosen and rejected must continue the same prompt (only the final assistant turn differs): "
               "make the turns before it identical, or remove the record")
NEEDS_BOTH = "a preference pair needs both a `chosen` and a `rejected` final answer"
COMPARED = "a pair's final turn is always compared (only the prompt's turns are never trained): remove the flag"
PROMPT_END = ("a pair's prompt must end with a user turn or a tool result, which chosen and rejected answer: remove "
              "the trailing assistant turn or add the user turn after it")
USER = {"role": "user", "content": "Q"}


def answer(content, **extra):
    return {"role": "assistant", "content": content, **extra}


BAD_PAIRS = {
    "supervised record": (
        {"messages": [USER, answer("A")]},
        [P + "record is a supervised conversation, not a preference pair (`chosen`/`rejected`); --stage dpo trains "
         "on pairs: train this data with --stage sft, or give each record a `chosen` and a `rejected` answer"],
    ),
    "unknown keys": ({"question": "Q"}, [P + f"record of no known format (keys: question); {PAIR_FORMATS}"]),
    "not an object": ([PLAIN], [P + f"record of no known format (a list, not a JSON object); {PAIR_FORMATS}"]),
    "rejected missing": ({"prompt": "Q", "chosen": "A"}, [P + f"rejected is missing; {NEEDS_BOTH}"]),
    "chosen missing": ({"prompt": "Q", "rejected": "A"}, [P + f"chosen is missing; {NEEDS_BOTH}"]),
    "chosen null": ({"prompt": "Q", "chosen": None, "rejected": "A"}, [P + f"chosen is null; {NEEDS_BOTH}"]),
    "identical answers": (
        {"prompt": [USER], "chosen": [answer("A", reasoning_content="R")],
         "rejected": answer("A", reasoning_content="R")},
        [P + "chosen and rejected are identical; a pair must differ in its final answer (remove the record, or pass "
         "--skip_invalid_records to drop such pairs, counted in the report)"],
    ),
    "several final messages": (
        {"prompt": [USER], "chosen": [answer("A"), answer("B")], "rejected": [answer("C")]},
        [P + "chosen has 2 messages; a pair compares one final assistant turn: keep only it (the turns before it "
         "belong in `prompt`)"],
    ),
    "several final turns, sharegpt": (
        {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "A"},
         "rejected": [{"from": "gpt", "value": "B"}, {"from": "gpt", "value": "C"}]},
        [P + "rejected has 2 messages; a pair compares one final assistant turn: keep only it (the turns before it "
         "belong in `conversations`)"],
    ),
    "empty final list": (
        {"prompt": [USER], "chosen": [], "rejected": "B"},
        [P + "chosen must be the final assistant message (an object, a list of one, or its text), got an empty list"],
    ),
    "prompts differ": (
        {"chosen": [USER, answer("A")], "rejected": [{"role": "user", "content": "Q?"}, answer("B")]},
        [P + f"rejected[0].content differs from chosen[0].content; {SAME_PROMPT}"],
    ),
    "prompt longer on one side": (
        {"chosen": [USER, answer("A"), USER, answer("B")], "rejected": [USER, answer("C")]},
        [P + f"rejected has 1 turn before its final answer and chosen has 3; {SAME_PROMPT}"],
    ),
    "whole conversations as text": (
        {"chosen": "A", "rejected": [USER, answer("B")]},
        [P + "chosen must be a list of messages ending with the final assistant turn, got string (without `prompt`, "
         "chosen and rejected are whole conversations)"],
    ),
    "prompt ends with the answer": (
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
         "chosen": {"from": "gpt", "value": "B"}, "rejected": {"from": "gpt", "value": "C"}},
        [P + f"conversations[1].from = 'gpt'; {PROMPT_END}"],
    ),
    "whole conversation with two answers": (
        {"chosen": [USER, answer("A"), answer("B")], "rejected": [USER, answer("A"), answer("C")]},
        [P + f"chosen[1].role = 'assistant'; {PROMPT_END}", P + f"rejected[1].role = 'assistant'; {PROMPT_END}"],
    ),
    "final turn not the assistant's": (
        {"prompt": [USER], "chosen": {"role": "user", "content": "A"}, "rejected": "B"},
        [P + "chosen.role = 'user'; chosen must end with an assistant turn: the answer a pair compares"],
    ),
    "whole conversation ending with a user turn": (
        {"chosen": [USER, answer("A"), USER], "rejected": [USER, answer("B")]},
        [P + "chosen[2].role = 'user'; chosen must end with an assistant turn: the answer a pair compares"],
    ),
    "empty text answer": (
        {"prompt": "Q", "chosen": "", "rejected": "B"},
        [P + "chosen is empty; an assistant turn needs a non-empty reply"],
    ),
    "whitespace answer": (
        {"prompt": [USER], "chosen": answer("A"), "rejected": [answer(" \n")]},
        [P + "rejected[0].content is whitespace only; an assistant turn needs a non-empty reply"],
    ),
    "empty alpaca answer": (
        {"instruction": "Q", "chosen": "A", "rejected": ""},
        [P + "rejected is empty; an assistant turn needs a non-empty reply"],
    ),
    "final turn not trained": (
        {"prompt": [USER], "chosen": answer("A", train=False), "rejected": answer("B", loss=True)},
        [P + f"chosen.train = false; {COMPARED}"],
    ),
    "final turn weighted 0": (
        {"chosen": [USER, answer("A")], "rejected": [USER, answer("B", weight=0)]},
        [P + f"rejected[1].weight = 0; {COMPARED}"],
    ),
    "a shared prompt's problem is reported once": (
        {"prompt": [{"role": "user", "content": 5}], "chosen": "A", "rejected": "B"},
        [P + "prompt[0].content must be a string, got integer"],
    ),
    "undeclared tool in a final turn": (
        {"prompt": [USER], "chosen": answer("A"), "rejected": {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "search", "arguments": {}}}]}},
        [P + "rejected.tool_calls[0] calls 'search', which is not a declared tool (the record declares no `tools`)"],
    ),
    "multimodal pair": (
        {"images": ["a.png"], "prompt": "<image>Q", "chosen": "A", "rejected": "B"},
        [P + "a multimodal record (`images`); this tool trains text-only chat models, and would train the "
         "placeholders as literal text: remove the media from the data, or use a vision-language trainer"],
    ),
}


@pytest.mark.parametrize("record, problems", list(BAD_PAIRS.values()), ids=list(BAD_PAIRS))
def test_bad_pair(record, problems):
    assert problems_of(record) == problems


def test_prompt_turns_flagged_trained_stay_masked():
    record = {"prompt": [USER, answer("A", train=True), USER], "chosen": "B", "rejected": "C"}
    assert pair_of(record).masked == (1,)
