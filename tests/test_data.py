"""Tests for chattune.data (records, reader, sources, load): formats, containers, validation messages, skipping, file-level errors."""

from __future__ import annotations

import json

import pytest

from chattune.data.load import LoadResult, load_conversations
from chattune.data.problems import DataError, Problem
from chattune.data.records import Conversation, normalize_record

SHAREGPT_ROLES = "expected one of user, human, assistant, gpt, system, function_call, observation"
MESSAGES_ROLES = "expected one of system, user, assistant, tool, function"
ALTERNATION = "after the optional system turn, turns must alternate user, assistant, starting with user"
KNOWN = "expected `conversations` (ShareGPT), `messages` (OpenAI) or `instruction`/`output` (Alpaca)"
SKIP_HINT = "Fix the records above, or pass --skip_invalid_records to drop them (the count is reported)."
FILE_HINT = "Fix or remove these paths; --skip_invalid_records drops invalid records, never unreadable files."

GOOD = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
GOOD_MESSAGES = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"})


def write(path, content: str | bytes):
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def problems_of(record) -> list[str]:
    conversation, problems = normalize_record(record, file="train.json", where="record 12")
    assert conversation is None
    return [str(problem) for problem in problems]


def messages_of(record) -> tuple[dict, ...]:
    conversation, problems = normalize_record(record, file="train.json", where="record 0")
    assert problems == []
    return conversation.messages


# ----------------------------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------------------------


def test_sharegpt_with_top_level_system():
    record = {
        "system": "You are terse.",
        "conversations": [
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
            {"from": "user", "value": "And 3+3?"},
            {"from": "assistant", "value": "6"},
        ],
        "id": "abc",
    }
    conversation, problems = normalize_record(record, file="train.json", where="record 3")
    assert problems == []
    assert conversation == Conversation(
        messages=(
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"},
        ),
        source="train.json: record 3",
        format="sharegpt",
    )


def test_sharegpt_system_turn_and_empty_top_level_system():
    record = {
        "system": "",
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
        ],
    }
    assert messages_of(record) == (
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    )


def test_messages_keeps_reasoning_content_only_where_given():
    record = {
        "messages": [
            {"role": "system", "content": "Think first."},
            {"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": "Yes.", "reasoning_content": "7 has no divisors but 1 and 7."},
            {"role": "user", "content": "And 9?"},
            {"role": "assistant", "content": "No, 9 = 3 * 3.", "name": "ignored"},
        ]
    }
    conversation, problems = normalize_record(record, file="chat.jsonl", where="line 4")
    assert problems == []
    assert conversation.format == "messages"
    assert conversation.source == "chat.jsonl: line 4"
    assert conversation.messages == (
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "Is 7 prime?"},
        {"role": "assistant", "content": "Yes.", "reasoning_content": "7 has no divisors but 1 and 7."},
        {"role": "user", "content": "And 9?"},
        {"role": "assistant", "content": "No, 9 = 3 * 3."},
    )


def test_messages_null_reasoning_content_counts_as_absent():
    # Parquet / datasets rows carry reasoning_content=None on messages that have none.
    record = {
        "messages": [
            {"role": "user", "content": "Hi", "reasoning_content": None},
            {"role": "assistant", "content": "Hello!", "reasoning_content": None},
        ]
    }
    assert messages_of(record) == GOOD_MESSAGES


def test_alpaca_with_system_history_and_input():
    record = {
        "system": "You translate.",
        "history": [["Say hi in French", "Bonjour"], ["In German?", "Hallo"]],
        "instruction": "Translate to Spanish:",
        "input": "Good morning",
        "output": "Buenos días",
    }
    conversation, problems = normalize_record(record, file="alpaca.json", where="record 0")
    assert problems == []
    assert conversation.format == "alpaca"
    assert conversation.messages == (
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Say hi in French"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "In German?"},
        {"role": "assistant", "content": "Hallo"},
        {"role": "user", "content": "Translate to Spanish:\nGood morning"},
        {"role": "assistant", "content": "Buenos días"},
    )


@pytest.mark.parametrize(
    "extra",
    [{}, {"input": ""}, {"input": None, "system": None, "history": None}, {"system": "", "history": []}],
)
def test_alpaca_without_input(extra):
    record = {"instruction": "Name a color.", "output": "Blue", **extra}
    assert messages_of(record) == (
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue"},
    )


def test_format_detected_from_non_null_key():
    # A mixed-format Parquet row: the unused format columns are null.
    record = {"conversations": None, "messages": None, "instruction": "Hi", "input": None, "output": "Hello!"}
    conversation, _ = normalize_record(record, file="mixed.parquet", where="record 0")
    assert conversation.format == "alpaca"
    assert conversation.messages == GOOD_MESSAGES


def test_content_preserved_exactly():
    code = "def f(x):\n\treturn x  \n\n# 注释 \r\n"
    chinese = "你好，世界！  \n第二行\t "
    record = {
        "messages": [
            {"role": "system", "content": "  系统提示  "},
            {"role": "user", "content": chinese},
            {"role": "assistant", "content": code, "reasoning_content": "\n思考…\n"},
        ]
    }
    messages = messages_of(record)
    assert [m["content"] for m in messages] == ["  系统提示  ", chinese, code]
    assert messages[2]["reasoning_content"] == "\n思考…\n"


def test_content_preserved_exactly_through_files(tmp_path):
    code = "```python\nprint('hi')   \n```\n\n"
    chinese = "请解释：量子纠缠。 "
    record = {"conversations": [{"from": "human", "value": chinese}, {"from": "gpt", "value": code}]}
    write(tmp_path / "a.jsonl", json.dumps(record, ensure_ascii=False) + "\n")
    write(tmp_path / "b.json", json.dumps([record], ensure_ascii=True))
    result = load_conversations([str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")])
    for conversation in result.conversations:
        assert conversation.messages[0]["content"].encode() == chinese.encode()
        assert conversation.messages[1]["content"].encode() == code.encode()


# ----------------------------------------------------------------------------------------------------------------
# Containers and paths
# ----------------------------------------------------------------------------------------------------------------


def test_json_array(tmp_path):
    path = write(tmp_path / "train.json", json.dumps([GOOD, GOOD], indent=2))
    result = load_conversations(str(path))
    assert [c.source for c in result.conversations] == [f"{path}: record 0", f"{path}: record 1"]
    assert [c.messages for c in result.conversations] == [GOOD_MESSAGES, GOOD_MESSAGES]
    assert result.files == [str(path)]
    assert result.format_counts == {"sharegpt": 2}
    assert result.skipped == [] and result.skipped_records == 0


def test_jsonl_with_blank_lines_and_crlf(tmp_path):
    line = json.dumps(GOOD)
    path = write(tmp_path / "train.jsonl", f"{line}\r\n\r\n   \n{line}\n")
    result = load_conversations(str(path))
    assert [c.source for c in result.conversations] == [f"{path}: line 1", f"{path}: line 4"]
    assert [c.messages for c in result.conversations] == [GOOD_MESSAGES, GOOD_MESSAGES]


def test_single_object_is_one_record(tmp_path):
    path = write(tmp_path / "one.json", json.dumps(GOOD, indent=2))
    result = load_conversations(str(path))
    assert [c.source for c in result.conversations] == [f"{path}: record 0"]


def test_utf8_bom_is_ignored(tmp_path):
    array = write(tmp_path / "bom.json", b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    lines = write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    result = load_conversations([str(array), str(lines)])
    assert [c.source for c in result.conversations] == [f"{array}: record 0", f"{lines}: line 1"]


def test_format_is_detected_from_content_not_extension(tmp_path):
    jsonl_named_json = write(tmp_path / "a.json", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    array_named_txt = write(tmp_path / "b.txt", json.dumps([GOOD]))
    result = load_conversations([str(jsonl_named_json), str(array_named_txt)])
    assert [c.source for c in result.conversations] == [
        f"{jsonl_named_json}: line 1",
        f"{jsonl_named_json}: line 2",
        f"{array_named_txt}: record 0",
    ]


def test_comma_separated_paths(tmp_path):
    a = write(tmp_path / "a.json", json.dumps([GOOD]))
    b = write(tmp_path / "b.jsonl", json.dumps({"instruction": "Hi", "output": "Hello!"}) + "\n")
    result = load_conversations(f"{a}, {b},")
    assert result.files == [str(a), str(b)]
    assert [c.source for c in result.conversations] == [f"{a}: record 0", f"{b}: line 1"]
    assert result.format_counts == {"sharegpt": 1, "alpaca": 1}


def test_directory_reads_data_files_sorted_not_recursive(tmp_path):
    write(tmp_path / "b.jsonl", json.dumps(GOOD) + "\n")
    write(tmp_path / "a.json", json.dumps([GOOD]))
    write(tmp_path / "notes.txt", "not data")
    write(tmp_path / ".hidden.json", b"\x00\x01")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "c.json", json.dumps([GOOD]))
    result = load_conversations(str(tmp_path))
    assert result.files == [str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")]
    assert len(result.conversations) == 2


def test_parquet_file_with_mixed_formats(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        GOOD,
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"instruction": "I", "output": "O"},
    ]
    columns = ["conversations", "messages", "instruction", "output"]
    rows = [{column: row.get(column) for column in columns} for row in rows]  # unused columns are null
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = load_conversations(str(path))
    assert [(c.source, c.format) for c in result.conversations] == [
        (f"{path}: record 0", "sharegpt"),
        (f"{path}: record 1", "messages"),
        (f"{path}: record 2", "alpaca"),
    ]
    assert result.conversations[1].messages == (
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    )
    assert result.conversations[2].messages == ({"role": "user", "content": "I"}, {"role": "assistant", "content": "O"})


def test_parquet_struct_columns_do_not_invent_arguments_or_schema_properties(tmp_path):
    """Arrow gives every struct of a column every field any row has: written as structs, one call's arguments gain
    the other's `unit: null`, one tool's schema the other's properties. Read back, each record is what it was."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    def record(name, arguments, properties):
        return {"tools": [{"type": "function", "function": {"name": name, "parameters": {
                    "type": "object", "properties": properties}}}],
                "messages": [{"role": "user", "content": "Q"},
                             {"role": "assistant", "content": "", "tool_calls": [
                                 {"type": "function", "function": {"name": name, "arguments": arguments}}]},
                             {"role": "tool", "content": "R"}, {"role": "assistant", "content": "A"}]}

    rows = [record("weather", {"city": "Oslo"}, {"city": {"type": "string"}}),
            record("convert", {"unit": "C"}, {"unit": {"type": "string"}})]
    path = tmp_path / "tools.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert pq.read_table(path).to_pylist()[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Oslo", "unit": None}  # what Arrow hands back: the invented field this guards against
    first, second = load_conversations(str(path)).conversations
    assert first.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert second.messages[1]["tool_calls"][0]["function"]["arguments"] == {"unit": "C"}
    assert first.tools[0]["function"]["parameters"]["properties"] == {"city": {"type": "string"}}


def test_parquet_bad_record_is_located(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    rows = [{"instruction": "I", "output": "O"}, {"instruction": "I", "output": ""}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as e:
        load_conversations(str(path))
    assert f"{path}: record 1: output is empty; an assistant turn needs a non-empty reply" in str(e.value)


def test_datasets_save_to_disk_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([GOOD, GOOD]).save_to_disk(str(tmp_path / "ds"))
    result = load_conversations(str(tmp_path / "ds"))
    assert result.files == [str(tmp_path / "ds")]
    assert [c.source for c in result.conversations] == [f"{tmp_path / 'ds'}: record 0", f"{tmp_path / 'ds'}: record 1"]
    assert [c.messages for c in result.conversations] == [GOOD_MESSAGES, GOOD_MESSAGES]


def test_datasets_save_to_disk_dataset_dict_uses_train(tmp_path):
    datasets = pytest.importorskip("datasets")
    bad = {"conversations": [{"from": "human", "value": "only a question"}]}
    splits = {"train": datasets.Dataset.from_list([GOOD]), "test": datasets.Dataset.from_list([bad])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    result = load_conversations(str(tmp_path / "dd"))
    assert [c.source for c in result.conversations] == [f"{tmp_path / 'dd'}: record 0"]


def test_datasets_dataset_dict_without_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {"validation": datasets.Dataset.from_list([GOOD]), "test": datasets.Dataset.from_list([GOOD])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as e:
        load_conversations(str(tmp_path / "dd"), skip_invalid=True)
    assert str(e.value) == "\n".join(
        [
            "Cannot use 1 data path:",
            f"  {tmp_path / 'dd'}: is a DatasetDict without a 'train' split (splits: validation, test); "
            f"pass the split's own directory instead, e.g. {tmp_path / 'dd' / 'validation'}",
            FILE_HINT,
        ]
    )


# ----------------------------------------------------------------------------------------------------------------
# Record problems
# ----------------------------------------------------------------------------------------------------------------


def test_problem_str():
    problem = Problem("train.json", "record 12", "conversations[3].from", f"= 'gpt4'; {SHAREGPT_ROLES}")
    assert str(problem) == "train.json: record 12: conversations[3].from = 'gpt4'; " + SHAREGPT_ROLES
    assert str(Problem("train.json", "", "", "is empty")) == "train.json: is empty"
    assert str(Problem("t.jsonl", "line 7", "", "not valid JSON")) == "t.jsonl: line 7: not valid JSON"


def sharegpt(*turns, **extra):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def messages(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


P = "train.json: record 12: "

BAD_RECORDS = {
    "not an object": ([GOOD], [P + f"record of no known format (a list, not a JSON object); {KNOWN}"]),
    "string record": ("hello", [P + f"record of no known format (a string, not a JSON object); {KNOWN}"]),
    "integer record": (7, [P + f"record of no known format (an integer, not a JSON object); {KNOWN}"]),
    "null record": (None, [P + f"record of no known format (null, not a JSON object); {KNOWN}"]),
    "unknown keys": (
        {"prompt": "a", "response": "b"},
        [P + f"record of no known format (keys: prompt, response); {KNOWN}"],
    ),
    "a key of a million characters": (
        {"k" * 1_000_000: 1},
        [P + f"record of no known format (keys: '{'k' * 37}...'); {KNOWN}"],  # not the whole key
    ),
    "empty object": ({}, [P + f"record of no known format (an empty object); {KNOWN}"]),
    "list not a list": ({"conversations": "Hi"}, [P + "conversations must be a list of turns, got string"]),
    "list is null": ({"messages": None}, [P + "messages must be a list of turns, got null"]),
    "empty list": (
        {"conversations": []},
        [P + "conversations is empty; expected a user turn followed by an assistant turn"],
    ),
    "turn not an object": (
        {"messages": [{"role": "user", "content": "Hi"}, ["assistant", "Hello"]]},
        [P + 'messages[1] must be an object like {"role": ..., "content": ...}, got list'],
    ),
    "missing from": (
        {"conversations": [{"value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        [P + f"conversations[0].from is missing; {SHAREGPT_ROLES}"],
    ),
    "unknown from": (
        sharegpt(("human", "Hi"), ("gpt4", "Hello!")),
        [P + f"conversations[1].from = 'gpt4'; {SHAREGPT_ROLES}"],
    ),
    "roles are case-sensitive": (
        messages(("User", "Hi"), ("assistant", "Hello!")),
        [P + f"messages[0].role = 'User'; {MESSAGES_ROLES}"],
    ),
    "role not a string": (
        {"messages": [{"role": 1, "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        [P + f"messages[0].role must be a string, got integer; {MESSAGES_ROLES}"],
    ),
    "tool result without a call": (
        messages(("user", "Hi"), ("tool", "{}"), ("assistant", "Hello!")),
        [P + "messages[1] is a tool result with no tool call before it to answer"],
    ),
    "content missing": (
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "Hello!"}]},
        [P + "messages[0].content is missing; expected a string"],
    ),
    "content null": (
        {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "Hello!"}]},
        [P + "conversations[0].value is null; expected a string"],
    ),
    "content a number": (
        messages(("user", 42), ("assistant", "Hello!")),
        [P + "messages[0].content must be a string, got integer"],
    ),
    "content parts": (
        messages(("user", [{"type": "text", "text": "Hi"}]), ("assistant", "Hello!")),
        [
            P + "messages[0].content must be a string, got list "
            "(content parts are not supported; join them into one string)"
        ],
    ),
    "system not first": (
        messages(("user", "Hi"), ("system", "Be nice."), ("assistant", "Hello!")),
        [P + "messages[1].role = 'system'; a system turn is only allowed as the first turn"],
    ),
    "top-level system and system turn": (
        sharegpt(("system", "B"), ("human", "Hi"), ("gpt", "Hello!"), system="A"),
        [P + "conversations[0].from = 'system'; the top-level `system` is also given; keep only one of them"],
    ),
    "top-level system not a string": (
        sharegpt(("human", "Hi"), ("gpt", "Hello!"), system=["A"]),
        [P + "system must be a string, got list"],
    ),
    "starts with assistant": (
        sharegpt(("gpt", "Hello!"), ("human", "Hi"), ("gpt", "Bye")),
        [P + f"conversations[0].from = 'gpt'; expected a user turn: {ALTERNATION}"],
    ),
    "two user turns": (
        messages(("system", "S"), ("user", "Hi"), ("user", "Hi again"), ("assistant", "Hello!")),
        [P + f"messages[2].role = 'user'; expected an assistant turn: {ALTERNATION}"],
    ),
    "two assistant turns": (
        sharegpt(("human", "Hi"), ("gpt", "Hello!"), ("assistant", "Anything else?")),
        [P + f"conversations[2].from = 'assistant'; expected a user turn: {ALTERNATION}"],
    ),
    "trailing user turn": (
        messages(("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")),
        [
            P + "messages[2].role = 'user'; the last turn must be an assistant turn: "
            "remove the trailing user turn or add the reply"
        ],
    ),
    "no assistant turn": (
        sharegpt(("human", "Hi")),
        [P + "conversations has no assistant turn; add at least one assistant reply to train on"],
    ),
    "only a system turn": (
        messages(("system", "S")),
        [P + "messages has no assistant turn; add at least one assistant reply to train on"],
    ),
    "assistant empty": (
        messages(("user", "Hi"), ("assistant", "")),
        [P + "messages[1].content is empty; an assistant turn needs a non-empty reply"],
    ),
    "assistant whitespace": (
        sharegpt(("human", "Hi"), ("gpt", " \n\t")),
        [P + "conversations[1].value is whitespace only; an assistant turn needs a non-empty reply"],
    ),
    "reasoning on a user message": (
        {"messages": [{"role": "user", "content": "Hi", "reasoning_content": "x"}, GOOD_MESSAGES[1]]},
        [P + "messages[0].reasoning_content is only allowed on assistant messages, not on a user message"],
    ),
    "reasoning not a string": (
        {"messages": [GOOD_MESSAGES[0], {"role": "assistant", "content": "A", "reasoning_content": 1}]},
        [P + "messages[1].reasoning_content must be a string, got integer"],
    ),
    "alpaca missing instruction": (
        {"output": "Hello!"},
        [P + "instruction is missing; expected a string (the user prompt)"],
    ),
    "alpaca missing output": (
        {"instruction": "Hi", "input": ""},
        [P + "output is missing; expected a string (the assistant reply)"],
    ),
    "alpaca output null": (
        {"instruction": "Hi", "output": None},
        [P + "output is null; expected a string (the assistant reply)"],
    ),
    "alpaca output empty": (
        {"instruction": "Hi", "output": ""},
        [P + "output is empty; an assistant turn needs a non-empty reply"],
    ),
    "alpaca input not a string": (
        {"instruction": "Hi", "input": 3, "output": "Hello!"},
        [P + "input must be a string, got integer"],
    ),
    "alpaca history not a list": (
        {"instruction": "Hi", "output": "Hello!", "history": "none"},
        [P + "history must be a list of [user, assistant] pairs, got string"],
    ),
    "alpaca history items": (
        {"instruction": "Hi", "output": "Hello!", "history": [["q"], {"q": "a"}, ["q", None], ["q", " "]]},
        [
            P + "history[0] must be a [user, assistant] pair of strings, got a list of 1 item",
            P + "history[1] must be a [user, assistant] pair of strings, got object",
            P + "history[2][1] is null; expected a string",
            P + "history[3][1] is whitespace only; an assistant turn needs a non-empty reply",
        ],
    ),
}


@pytest.mark.parametrize("record, expected", list(BAD_RECORDS.values()), ids=list(BAD_RECORDS))
def test_bad_record(record, expected):
    assert problems_of(record) == expected


def test_all_problems_of_a_record_are_reported():
    record = {
        "system": 5,
        "conversations": [
            {"from": "gpt4", "value": "Hi"},
            {"from": "human", "value": 7},
            {"from": "human", "value": "Q"},
            {"from": "system", "value": "late"},
            {"from": "gpt", "value": "  "},
            "oops",
            {"value": "no role"},
        ],
    }
    # Sorted by turn, whatever check found them.
    assert problems_of(record) == [
        P + "system must be a string, got integer",
        P + f"conversations[0].from = 'gpt4'; {SHAREGPT_ROLES}",
        P + "conversations[1].value must be a string, got integer",
        P + f"conversations[2].from = 'human'; expected an assistant turn: {ALTERNATION}",
        P + "conversations[3].from = 'system'; a system turn is only allowed as the first turn",
        P + "conversations[4].value is whitespace only; an assistant turn needs a non-empty reply",
        P + 'conversations[5] must be an object like {"from": ..., "value": ...}, got string',
        P + f"conversations[6].from is missing; {SHAREGPT_ROLES}",
    ]


def test_alpaca_problems_are_all_reported():
    record = {"instruction": None, "input": [], "output": " ", "system": 1, "history": [[1, "a"]]}
    assert problems_of(record) == [
        P + "system must be a string, got integer",
        P + "history[0][0] must be a string, got integer",
        P + "instruction is null; expected a string (the user prompt)",
        P + "input must be a string, got list",
        P + "output is whitespace only; an assistant turn needs a non-empty reply",
    ]


def test_long_role_value_is_shortened():
    record = sharegpt(("human", "Hi"), ("x" * 100, "Hello!"))
    assert problems_of(record) == [P + f"conversations[1].from = '{'x' * 37}...'; {SHAREGPT_ROLES}"]


# ----------------------------------------------------------------------------------------------------------------
# load_conversations: error message, skipping
# ----------------------------------------------------------------------------------------------------------------

NO_REPLY = sharegpt(("human", "Hi"))  # 1 problem


def test_error_lists_first_20_problems_and_count(tmp_path):
    records = [GOOD] * 5 + [NO_REPLY] * 10 + [messages(("user", 1), ("assistant", ""))] * 6 + [GOOD]
    train = write(tmp_path / "train.json", json.dumps(records))
    extra = write(tmp_path / "extra.jsonl", "\n".join([json.dumps(GOOD), "{broken", json.dumps({"a": 1})]) + "\n")
    with pytest.raises(DataError) as e:
        load_conversations(f"{train},{extra}")
    no_reply = "conversations has no assistant turn; add at least one assistant reply to train on"
    lines = [f"  {train}: record {i}: {no_reply}" for i in range(5, 15)]
    for i in range(15, 20):
        lines += [
            f"  {train}: record {i}: messages[0].content must be a string, got integer",
            f"  {train}: record {i}: messages[1].content is empty; an assistant turn needs a non-empty reply",
        ]
    # 10 + 12 + 2 = 24 problems in 10 + 6 + 2 = 18 of 22 + 3 = 25 records; the first 20 are shown.
    assert str(e.value) == "\n".join(
        [
            f"Found 24 problems in 18 of 25 records ({train}, {extra}):",
            *lines,
            "  ... and 4 more",
            SKIP_HINT,
        ]
    )


def test_error_message_without_truncation(tmp_path):
    path = write(tmp_path / "t.jsonl", json.dumps(GOOD) + "\n" + json.dumps(NO_REPLY) + "\n")
    with pytest.raises(DataError) as e:
        load_conversations(str(path))
    assert str(e.value) == "\n".join(
        [
            f"Found 1 problem in 1 of 2 records ({path}):",
            f"  {path}: line 2: conversations has no assistant turn; add at least one assistant reply to train on",
            SKIP_HINT,
        ]
    )
    assert isinstance(e.value, ValueError)


def test_bad_jsonl_line_is_a_record_problem(tmp_path):
    path = write(tmp_path / "t.jsonl", "\n".join([json.dumps(GOOD), '{"conversations": [}', json.dumps(GOOD), "[1]"]))
    with pytest.raises(DataError) as e:
        load_conversations(str(path))
    assert str(e.value).splitlines()[1:3] == [
        f"  {path}: line 2: not valid JSON: Expecting value at column 20; "
        "each line of a JSONL file must be one JSON object",
        f"  {path}: line 4: record of no known format (a list, not a JSON object); {KNOWN}",
    ]
    result = load_conversations(str(path), skip_invalid=True)
    assert [c.source for c in result.conversations] == [f"{path}: line 1", f"{path}: line 3"]
    assert result.skipped_records == 2


def test_skip_invalid_drops_and_counts(tmp_path):
    two_problems = messages(("assistant", "A"), ("user", "Q"))
    path = write(tmp_path / "t.json", json.dumps([GOOD, NO_REPLY, two_problems, {"instruction": "I", "output": "O"}]))
    result = load_conversations(str(path), skip_invalid=True)
    assert isinstance(result, LoadResult)
    assert [c.source for c in result.conversations] == [f"{path}: record 0", f"{path}: record 3"]
    assert result.skipped_records == 2
    assert [str(p) for p in result.skipped] == [
        f"{path}: record 1: conversations has no assistant turn; add at least one assistant reply to train on",
        f"{path}: record 2: messages[0].role = 'assistant'; expected a user turn: {ALTERNATION}",
        f"{path}: record 2: messages[1].role = 'user'; the last turn must be an assistant turn: "
        "remove the trailing user turn or add the reply",
    ]
    assert result.skipped[0] == Problem(
        str(path), "record 1", "conversations", "has no assistant turn; add at least one assistant reply to train on"
    )
    assert result.format_counts == {"sharegpt": 1, "alpaca": 1}


def test_nothing_left_after_skipping(tmp_path):
    path = write(tmp_path / "t.json", json.dumps([NO_REPLY]))
    with pytest.raises(DataError) as e:
        load_conversations(str(path), skip_invalid=True)
    assert str(e.value) == "\n".join(
        [
            f"No valid records in {path}: all 1 were invalid and skipped; nothing is left to train on.",
            f"  {path}: record 0: conversations has no assistant turn; add at least one assistant reply to train on",
        ]
    )


def test_no_records_at_all(tmp_path):
    path = write(tmp_path / "t.json", "[]")
    with pytest.raises(DataError) as e:
        load_conversations(str(path))
    assert str(e.value) == f"No records in {path}; there is nothing to train on."


# ----------------------------------------------------------------------------------------------------------------
# File-level problems: never skippable
# ----------------------------------------------------------------------------------------------------------------


def file_error(path, *, skip_invalid=True) -> str:
    with pytest.raises(DataError) as e:
        load_conversations(str(path), skip_invalid=skip_invalid)
    return str(e.value)


def one_file_problem(problem: str) -> str:
    return "\n".join(["Cannot use 1 data path:", f"  {problem}", FILE_HINT])


@pytest.mark.parametrize("content", ["", "  \n\t\n", b"\xef\xbb\xbf"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path / "t.json", content)
    expected = f"{path}: is empty; expected a JSON array of records, one JSON object, or JSONL (one per line)"
    assert file_error(path) == one_file_problem(expected)


def test_undecodable_bytes(tmp_path):
    path = write(tmp_path / "t.jsonl", json.dumps(GOOD).encode() + b"\n" + b'{"x": "caf\xe9"}\n')
    offset = len(json.dumps(GOOD)) + 1 + len('{"x": "caf')
    expected = (
        f"{path}: is not valid UTF-8: byte 0xe9 at byte offset {offset} (line 2); "
        "the file must be UTF-8 encoded (re-save it as UTF-8)"
    )
    assert file_error(path) == one_file_problem(expected)


def test_undecodable_bytes_offset_counts_bom(tmp_path):
    path = write(tmp_path / "t.json", b"\xef\xbb\xbf[\xff]")
    assert "byte 0xff at byte offset 4 (line 1)" in file_error(path)


def test_broken_json_array(tmp_path):
    path = write(tmp_path / "t.json", '[\n  {"conversations": []},\n  {"conversations": [}\n]')
    expected = f"{path}: is not valid JSON: Expecting value at line 3 column 22"
    assert file_error(path) == one_file_problem(expected)


def test_broken_pretty_printed_object_is_not_jsonl(tmp_path):
    text = '{\n  "conversations": [\n    {"from": "human", "value": "Hi"}\n    {"from": "gpt", "value": "Yo"}\n  ]\n}\n'
    path = write(tmp_path / "t.json", text)
    expected = f"{path}: is not valid JSON: Expecting ',' delimiter at line 4 column 5"
    assert file_error(path) == one_file_problem(expected)


def test_missing_path(tmp_path):
    path = tmp_path / "nope.json"
    assert file_error(path) == one_file_problem(f"{path}: does not exist")


def test_directory_without_data_files(tmp_path):
    write(tmp_path / "readme.md", "hi")
    expected = (f"{tmp_path}: is a directory without .json, .jsonl, .json.gz, .jsonl.gz or .parquet files "
                "(subdirectories are not searched)")
    assert file_error(tmp_path) == one_file_problem(expected)


def test_broken_parquet(tmp_path):
    path = write(tmp_path / "t.parquet", b"not parquet at all")
    assert file_error(path).startswith(f"Cannot use 1 data path:\n  {path}: cannot be read as Parquet: ")


def test_file_and_record_problems_are_reported_together(tmp_path):
    good = write(tmp_path / "good.json", json.dumps([GOOD, NO_REPLY]))
    missing = tmp_path / "missing.json"
    empty = write(tmp_path / "empty.jsonl", "")
    with pytest.raises(DataError) as e:
        load_conversations([str(good), str(missing), str(empty)])
    assert str(e.value) == "\n".join(
        [
            "Cannot use 2 data paths:",
            f"  {missing}: does not exist",
            f"  {empty}: is empty; expected a JSON array of records, one JSON object, or JSONL (one per line)",
            FILE_HINT,
            "",
            f"Found 1 problem in 1 of 2 records ({good}):",
            f"  {good}: record 1: conversations has no assistant turn; add at least one assistant reply to train on",
            SKIP_HINT,
        ]
    )
    # With skip_invalid the record problem is skippable, the file problems are not.
    assert file_error(f"{good},{missing},{empty}").startswith("Cannot use 2 data paths:\n")
    assert "Found" not in file_error(f"{good},{missing},{empty}")


def test_no_path_given():
    with pytest.raises(DataError, match="No data path given"):
        load_conversations(" , ")


# ----------------------------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------------------------
