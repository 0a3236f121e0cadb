"""Preference pairs are token-exact: chosen and rejected share exactly apply_chat_template(prompt, tools=...,
add_generation_prompt=True, tokenize=True), and each answer is tokenized as supervised training tokenizes it (on its
own, through its end-of-turn token), on the published templates of Qwen2.5, Qwen3 and Qwen3.5/3.6/3.8."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from test_real_templates import (
    CALL,
    RESULT,
    SEARCH,
    WEATHER,
    A,
    U,
    reference,
    trained_runs,
)
from test_real_templates import tokenizer as build_tokenizer

from chattune.data import encode
from chattune.data.chat_templates import setup_chat_template
from chattune.data.pairs import normalize_pair, pair_record
from chattune.data.report import report_of

SEARCH_CALL = A("", reasoning_content="look it up", tool_calls=[
    {"type": "function", "function": {"name": "search", "arguments": {"query": "rain Paris"}}}])
PROMPTS = {
    "single": ([U("Is it raining in Paris?")], None),
    "multi-turn": ([{"role": "system", "content": "You are terse."}, U("Hi"), A("Hello!"), U("2+2?")], None),
    "after tools": ([U("Umbrella in Paris?"), CALL, RESULT], [WEATHER]),
    "agent": ([U("Umbrella in Paris?"), A("", reasoning_content="check", tool_calls=CALL["tool_calls"]), RESULT,
               A("It rains.", reasoning_content="rain"), U("And tomorrow?")], [WEATHER, SEARCH]),
}
ANSWERS = {
    "plain": (A("Yes, take one."), A("No idea.")),
    "reasoning": (A("Yes.", reasoning_content="the sky is rain"), A("No.", reasoning_content="guessing")),
    "tool call vs answer": (SEARCH_CALL, A("Probably not.", reasoning_content="a guess")),
    "newline": (A("\nYes"), A("\n\nNo")),
}
tokenizer = functools.cache(build_tokenizer)  # one per family: the tests only read it

FAMILIES = [("qwen2_5", {}), ("qwen3", {}), ("qwen3_5", {}), ("qwen3_5", {"enable_thinking": False}),
            ("qwen3_6", {"preserve_thinking": True}), ("qwen3_8", {"reasoning_effort": "low"})]


def cases():
    for family, kwargs in FAMILIES:
        for prompt_name, (prompt, tools) in PROMPTS.items():
            for answer_name, (chosen, rejected) in ANSWERS.items():
                if kwargs.get("enable_thinking") is False and answer_name != "plain":
                    continue  # a turn with reasoning cannot follow the closed empty think block
                yield family, kwargs, prompt_name, answer_name


def pair_of(prompt, tools, chosen, rejected) -> dict:
    record = {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
    if tools or any(m.get("tool_calls") for m in (chosen, rejected)):
        record["tools"] = [WEATHER, SEARCH]
    return json.loads(json.dumps(record))  # as read from a file


@pytest.mark.parametrize("family, kwargs, prompt_name, answer_name", list(cases()),
                         ids=lambda v: v if isinstance(v, str) else json.dumps(v) if v else "default")
def test_chosen_and_rejected_share_the_exact_prompt_and_tokenize_as_sft_answers(family, kwargs, prompt_name,
                                                                              answer_name):
    tok, extra_stops = tokenizer(family)
    setup = setup_chat_template(tok, "auto", extra_stops)
    prompt, tools = PROMPTS[prompt_name]
    chosen, rejected = ANSWERS[answer_name]
    record = pair_of(prompt, tools, chosen, rejected)
    conv, problems = normalize_pair(record, file="pairs.jsonl", where="line 1")
    assert problems == []
    tools = record.get("tools")
    job = encode.EncodeJob([conv], tok, kwargs, list(setup.stop_tokens), 8192, pairs=True)
    encoded = encode.encode_conversations((0, 1), job)
    kept = encode.kept_arrays(encoded)
    assert kept["lengths"].tolist() == encoded["kept_length"].tolist() and len(kept["lengths"]) == 2
    cut = kept["lengths"].cumsum()[:-1]
    sides = list(zip(np.split(kept["input_ids"], cut), np.split(kept["labels"], cut), strict=True))
    runs = [trained_runs([side]) for side in sides]
    assert [len(r) for r in runs] == [1, 1]  # exactly the final answer is trained, on each side
    inference_prompt = tok.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, **kwargs)["input_ids"]
    for side, answer in zip(runs, (chosen, rejected), strict=True):
        (before, trained), = side
        expected = reference(tok, [*prompt, answer], tools, setup.stop_tokens, kwargs)[-1]
        assert before == inference_prompt  # the shared prompt: inference's own ids
        assert (before, trained) == expected
    report = report_of(encoded, 8192, 1, [], 0)
    assert (report.pairs, report.pairs_dropped, report.kept) == (1, 0, 2)


def test_canonical_pair_records_read_back_to_the_same_tokens(tmp_path):
    tok, extra = tokenizer("qwen3_5")
    setup = setup_chat_template(tok, "auto", extra)
    prompt, tools = PROMPTS["agent"]
    conv, _ = normalize_pair(pair_of(prompt, tools, *ANSWERS["tool call vs answer"]), file="a", where="line 1")
    again, problems = normalize_pair(json.loads(json.dumps(pair_record(conv))), file="b", where="line 1")
    assert problems == []

    def ids(c):
        return encode.encode_conversations((0, 1), encode.EncodeJob([c], tok, {}, list(setup.stop_tokens), 8192,
                                                                    pairs=True))["input_ids"].tolist()

    assert ids(again) == ids(conv)


def test_a_pair_whose_answer_lies_beyond_the_limit_is_dropped_whole_and_counted():
    tok, extra = tokenizer("qwen2_5")
    setup = setup_chat_template(tok, "auto", extra)
    short, _ = normalize_pair(pair_of([U("Hi")], None, A("Hello!"), A("Hey.")), file="p", where="line 1")
    long_answer, _ = normalize_pair(pair_of([U("Hi")], None, A("Hello!"), A("word " * 400)), file="p", where="line 2")
    long_prompt, _ = normalize_pair(pair_of([U("word " * 400)], None, A("a"), A("b")), file="p", where="line 3")
    job = encode.EncodeJob([short, long_answer, long_prompt], tok, {}, list(setup.stop_tokens), 64, pairs=True)
    encoded = encode.encode_conversations((0, 3), job)
    kept = encode.kept_arrays(encoded)
    report = report_of(encoded, 64, 3, [], 0)
    # the long rejected answer is truncated (still trained); the long prompt leaves no answer token: dropped whole
    assert (report.pairs, report.pairs_dropped, report.kept) == (3, 1, 4)
    assert len(kept["lengths"]) == 4 and report.truncated >= 1
    assert "pairs kept 2" in report.format() and "dropped because a side's answer lies beyond 64 tokens: 1" in \
        report.format()


def test_a_pair_is_kept_or_dropped_whole():
    """Both sides share the prompt, so both keep an answer token or neither does; should a side still come out empty
    (a template that renders one answer's prompt longer), its partner goes too: the rows stay chosen, rejected."""
    encoded = {"trained": np.array([3, 0, 2, 2, 0, 0]), "paired": np.ones(6, bool)}
    assert encode.kept_samples(encoded).tolist() == [False, False, True, True, False, False]
    assert encode.kept_samples({"trained": np.array([3, 0, 2])}).tolist() == [True, False, True]
