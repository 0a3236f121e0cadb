"""The data stage end to end: files -> validated conversations -> tokens/labels, report, cache, and the CLI."""

import json
from pathlib import Path

import forkrun
import pytest
from transformers import AutoTokenizer

from chattune.data.load import load_conversations
from chattune.data.prepare import prepare_dataset
from chattune.data.report import length_histogram, trained_segments
from chattune.data.tokenizer import prepare_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_cli(*args, check_rc=0):
    return forkrun.script("finetune.py", *args, rc=check_rc)


def raw_to_messages(record):
    """Independent normalization for the reference (mirrors the documented formats, not data.py's code)."""
    if "conversations" in record:
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        msgs = [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]
        return ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + msgs
    if "messages" in record:
        return record["messages"]
    msgs = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for u, a in record.get("history") or []:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    user = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def read_records(path: Path):
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]


def reference(tok, messages):
    """Token-level reference from apply_chat_template alone: answer i is what follows the generation prompt.

    (Valid for these files, where no BPE merge crosses a turn boundary; merges are covered in test_template.py.)
    """
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tok.apply_chat_template(messages[:i], add_generation_prompt=True, return_dict=True)["input_ids"])
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        end = len(tok(upto.rstrip(), add_special_tokens=False)["input_ids"])
        labels[start:end] = ids[start:end]
    return ids, labels


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "deepseek"])
@pytest.mark.parametrize("example", ["sharegpt.json", "messages.jsonl", "alpaca.json"])
def test_dump_equals_apply_chat_template_reference(model_dirs, tmp_path, family, example):
    import finetune

    model = model_dirs(family)
    out = tmp_path / "dump.jsonl"
    assert finetune.main(["--model_name_or_path", str(model), "--data_path", str(EXAMPLES / example), "--output_dir",
                          str(tmp_path / "o"), "--dump_tokenized", str(out), "--data_cache_dir", str(tmp_path)]) == 0
    dumped = [json.loads(line) for line in out.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model)
    expected = [reference(tok, raw_to_messages(r)) for r in read_records(EXAMPLES / example)]
    assert len(dumped) == len(expected)
    for got, (ids, labels) in zip(dumped, expected):
        assert got["input_ids"] == ids
        assert got["labels"] == labels


@pytest.mark.slow
def test_cli_malformed_file_exits_with_message_no_traceback(model_dirs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "gpt4", "content": "x"}]}\n{not json\n')
    proc = run_cli("--model_name_or_path", model_dirs("qwen2"), "--data_path", bad, "--output_dir", tmp_path / "o",
                   "--dump_tokenized", tmp_path / "d.jsonl", check_rc=2)
    assert "Traceback" not in proc.stderr
    assert "bad.jsonl: line 2: messages[0].role = 'gpt4'" in proc.stderr
    assert "bad.jsonl: line 3: not valid JSON" in proc.stderr
    assert not (tmp_path / "d.jsonl").exists()
    # the same file with --skip_invalid_records keeps the good record and says how many were dropped
    proc = run_cli("--model_name_or_path", model_dirs("qwen2"), "--data_path", bad, "--output_dir", tmp_path / "o",
                   "--dump_tokenized", tmp_path / "d.jsonl", "--skip_invalid_records", "--data_cache_dir", tmp_path / "c")
    assert "2 invalid records skipped" in proc.stderr
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_cli_unknown_flag_and_missing_template(model_dirs, tmp_path):
    proc = run_cli("--model_name_or_path", model_dirs("qwen2"), "--data_path", EXAMPLES / "alpaca.json",
                   "--output_dir", tmp_path, "--no_such_flag", "1", check_rc=2)
    assert "unknown arguments: --no_such_flag 1" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("--model_name_or_path", model_dirs("qwen2"), "--data_path", EXAMPLES / "alpaca.json",
                   "--output_dir", tmp_path, "--template", "nope", check_rc=2)
    assert "--template 'nope': choose one of auto, chatml, qwen" in proc.stderr


def test_truncation_and_drop_accounting(model_dirs, tmp_path):
    tok, setup = prepare_tokenizer(str(model_dirs("qwen2")), "auto")
    records = read_records(EXAMPLES / "sharegpt.json")
    records.append({"conversations": [{"from": "human", "value": "Please read this carefully. " * 12},
                                      {"from": "gpt", "value": "Done."}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    convs = load_conversations(str(tmp_path / "data.json")).conversations
    full = prepare_dataset(convs, tok, stop_tokens=setup.stop_tokens, max_length=100_000, cache_dir=tmp_path)
    lengths = [len(r["input_ids"]) for r in full.dataset]
    first_trained = [next(i for i, x in enumerate(r["labels"]) if x != -100) for r in full.dataset]
    max_length = 40
    short = prepare_dataset(convs, tok, stop_tokens=setup.stop_tokens, max_length=max_length, cache_dir=tmp_path)
    report = short.report
    dropped = sum(1 for f in first_trained if f >= max_length)
    truncated = [n for n, f in zip(lengths, first_trained) if n > max_length and f < max_length]
    assert report.samples == len(convs) == 14
    assert report.dropped_no_trained == dropped == 1
    assert report.kept == len(short.dataset) == 14 - dropped
    assert report.truncated == len(truncated) > 0
    assert report.truncated_tokens == sum(n - max_length for n in truncated)
    assert all(len(r["input_ids"]) <= max_length for r in short.dataset)
    assert sum(report.length_histogram.values()) == 14
    assert report.length_histogram[f"> {max_length}"] == sum(1 for n in lengths if n > max_length)
    # every kept sample still has a trained token and a truncated one is the prefix of the full one
    survivors = [r for r, f in zip(full.dataset, first_trained, strict=True) if f < max_length]
    for r, whole in zip(short.dataset, survivors, strict=True):
        assert any(x != -100 for x in r["labels"])
        assert r["input_ids"] == whole["input_ids"][: len(r["input_ids"])]


def test_cache_is_reused_and_keyed_by_settings(model_dirs, tmp_path):
    tok, setup = prepare_tokenizer(str(model_dirs("qwen2")), "auto")
    convs = load_conversations(str(EXAMPLES / "sharegpt.json")).conversations
    kw = dict(stop_tokens=setup.stop_tokens, cache_dir=tmp_path)
    first = prepare_dataset(convs, tok, max_length=64, **kw)
    again = prepare_dataset(convs, tok, max_length=64, **kw)
    other = prepare_dataset(convs, tok, max_length=65, **kw)
    assert not first.from_cache and again.from_cache and not other.from_cache
    assert again.cache_path == first.cache_path != other.cache_path
    assert again.report == first.report
    assert again.dataset["input_ids"][:] == first.dataset["input_ids"][:]


@pytest.mark.slow
@pytest.mark.parametrize("module", ["data.template", "data.records", "data.reader", "data.encode", "data.prepare"])
def test_cache_is_keyed_on_the_rendering_and_masking_code(model_dirs, tmp_path, monkeypatch, module):
    """Labels cached by older code are not served after the code that renders or masks them changes."""
    import importlib

    tok, setup = prepare_tokenizer(str(model_dirs("qwen2")), "auto")
    convs = load_conversations(str(EXAMPLES / "sharegpt.json")).conversations
    kw = dict(stop_tokens=setup.stop_tokens, cache_dir=tmp_path / "cache", max_length=64)
    first = prepare_dataset(convs, tok, **kw)
    assert prepare_dataset(convs, tok, **kw).from_cache
    source = importlib.import_module(f"chattune.{module}")
    changed = tmp_path / f"{module}.py"
    changed.write_text(Path(source.__file__).read_text() + "\n# a changed masking rule\n")
    monkeypatch.setattr(source, "__file__", str(changed))
    after = prepare_dataset(convs, tok, **kw)
    assert not after.from_cache and after.cache_path != first.cache_path
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # temporary directories are committed or removed


@pytest.mark.slow
def test_parallel_workers_give_identical_output(model_dirs, tmp_path):
    tok, setup = prepare_tokenizer(str(model_dirs("deepseek")), "auto")
    convs = load_conversations(str(EXAMPLES / "sharegpt.json")).conversations * 200  # 2600 conversations, 3 chunks
    serial = prepare_dataset(convs, tok, stop_tokens=setup.stop_tokens, max_length=512, num_proc=1,
                             cache_dir=tmp_path / "a")
    parallel = prepare_dataset(convs, tok, stop_tokens=setup.stop_tokens, max_length=512, num_proc=2,
                               cache_dir=tmp_path / "b")
    assert serial.report == parallel.report
    assert serial.dataset["labels"][:] == parallel.dataset["labels"][:]
    assert len(parallel.dataset) == 2600 and serial.dataset["input_ids"][:] == parallel.dataset["input_ids"][:]


def test_per_turn_samples_are_reported(model_dirs, tmp_path):
    tok, setup = prepare_tokenizer(str(model_dirs("qwen3")), "auto")
    path = tmp_path / "r.jsonl"
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning_content": "r1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "reasoning_content": "r2"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    prepared = prepare_dataset(load_conversations(str(path)).conversations, tok, stop_tokens=setup.stop_tokens,
                               max_length=512, cache_dir=tmp_path)
    assert prepared.report.samples == 2 and prepared.report.own_turn_samples == 1
    segments = [trained_segments(tok, r["input_ids"], r["labels"]) for r in prepared.dataset]
    assert segments == [["<think>\nr2\n</think>\n\nA2<|im_end|>"], ["<think>\nr1\n</think>\n\nA1<|im_end|>"]]


def test_length_histogram_literal():
    assert length_histogram([1, 64, 65, 300, 301], 300) == {"1-64": 2, "65-128": 1, "129-256": 0, "257-300": 1,
                                                            "> 300": 1}
