"""--val_size: a seeded held-out split by conversation, written to the run; evaluation on it, the best checkpoint
kept (--load_best_model_at_end, --early_stopping_patience) and loss.png next to trainer_state.json."""

import json
import subprocess
from pathlib import Path

import forkrun
import pytest
from safetensors.torch import load_file

from chattune.data.load import load_conversations
from chattune.data.problems import DataError
from chattune.data.split import (
    carry_held_out,
    conversation_record,
    held_out_of,
    parse_val_size,
    split_data,
)
from chattune.errors import ConfigError
from chattune.export.merge import run_info

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def conversations(path):
    return [(c.messages, c.tools, c.masked) for c in load_conversations(path).conversations]


def write_jsonl(path: Path, n: int) -> Path:
    lines = [json.dumps({"conversations": [{"from": "human", "value": f"question {i}"},
                                           {"from": "gpt", "value": f"answer {i}"}]}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("name", ["sharegpt.json", "messages.jsonl", "tools.jsonl", "alpaca.json"])
def test_a_conversation_record_reads_back_to_the_same_conversation(name, tmp_path):
    """val.jsonl holds canonical records: tools, reasoning, tool calls and untrained turns survive the round trip."""
    original = load_conversations(EXAMPLES / name).conversations
    path = tmp_path / "again.jsonl"
    path.write_text("".join(json.dumps(conversation_record(c)) + "\n" for c in original))
    assert conversations(path) == [(c.messages, c.tools, c.masked) for c in original]


def test_the_split_is_seeded_exact_disjoint_and_complete(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", 50)
    split = split_data(str(data), 0.2, seed=7, cache_dir=tmp_path / "cache")
    train, val = conversations(split.train), conversations(split.val)
    assert (split.conversations, split.held_out, len(val), len(train)) == (50, 10, 10, 40)
    every = conversations(data)
    assert sorted(map(str, train + val)) == sorted(map(str, every))  # nothing lost, nothing twice
    ids = json.loads(split.ids.read_text())
    assert len(ids) == 10 and all(i.startswith(f"{data}: line ") for i in ids)
    lines = [int(i.rsplit(" ", 1)[1]) for i in ids]
    assert [every[n - 1] for n in lines] == val  # the ids name the held-out records
    assert len(train) + len(val) == 50 and not set(map(str, train)) & set(map(str, val))
    again = split_data(str(data), 0.2, seed=7, cache_dir=tmp_path / "other")
    assert conversations(again.val) == val  # same data and seed, another cache: the same split
    other = split_data(str(data), 0.2, seed=8, cache_dir=tmp_path / "cache")
    assert conversations(other.val) != val
    assert split_data(str(data), 3, seed=7, cache_dir=tmp_path / "cache").held_out == 3  # a count


def test_invalid_records_fail_the_split_or_are_skipped_and_counted(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", 6)
    with data.open("a") as f:
        f.write("{oops\n")
    with pytest.raises(DataError, match=r"d.jsonl: line 7: not valid JSON"):
        split_data(str(data), 2, seed=0, cache_dir=tmp_path / "cache")
    split = split_data(str(data), 2, seed=0, cache_dir=tmp_path / "cache", skip_invalid=True)
    assert (split.conversations, split.held_out, split.skipped_records) == (6, 2, 1)
    assert any("line 7: not valid JSON" in e for e in split.skipped_examples)
    with pytest.raises(DataError, match="leaving nothing to train on"):
        split_data(str(data), 6, seed=0, cache_dir=tmp_path / "cache", skip_invalid=True)


@pytest.mark.parametrize("text, expected", [("0", None), ("0.05", 0.05), ("200", 200), ("1", 1)])
def test_val_size_is_a_fraction_or_a_count(text, expected):
    assert parse_val_size(text) == expected


@pytest.mark.parametrize("text", ["1.5", "-1", "ten", "nan"])
def test_a_bad_val_size_is_refused(text):
    with pytest.raises(ConfigError, match="give a fraction between 0 and 1"):
        parse_val_size(text)


@pytest.mark.parametrize("extra, message", [
    (["--val_size", "0.1", "--eval_data_path", "examples/sharegpt.json"], "both give evaluation data: use one"),
    (["--early_stopping_patience", "2"], "--early_stopping_patience 2: needs evaluation data; add --val_size"),
    (["--load_best_model_at_end", "True"], "--load_best_model_at_end: needs evaluation data; add --val_size"),
    (["--val_size", "2.5"], "--val_size 2.5: give a fraction between 0 and 1"),
])
def test_evaluation_flags_without_evaluation_data_are_one_clear_error(extra, message, tmp_path, model_dirs, capsys):
    import finetune

    with pytest.raises(SystemExit) as e:
        finetune.main(["--model_name_or_path", str(model_dirs("qwen2")), "--data_path", "examples/sharegpt.json",
                       "--output_dir", str(tmp_path / "o"), "--use_cpu", "True", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def train(model_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["finetune.py", "--model_name_or_path", str(model_dir), "--data_path",
            str(EXAMPLES / "sharegpt.json"), "--output_dir", str(out), "--use_cpu", "True", "--save_steps", "1",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--preview_data", "0",
            "--data_cache_dir", str(out.parent / "cache"), "--seed", "0", *extra]
    proc = forkrun.run(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def weights_file(folder: Path) -> Path:
    return folder / ("adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists()
                     else "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_early_stopping_keeps_the_best_checkpoint_and_evaluates_on_the_held_out_split(mode, model_dirs, tmp_path):
    """A learning rate high enough that the held-out loss turns up: training stops after two evaluations without
    a better one, the saved model is the best checkpoint's (not the last one's), the held-out conversations are in
    the output directory and were evaluated (not trained), and loss.png is drawn next to every trainer_state.json."""
    out = tmp_path / mode
    flags = {"lora": ["--use_lora", "--learning_rate", "0.3"], "full": ["--learning_rate", "0.03"],
             "qlora": ["--use_lora", "--q_lora", "--learning_rate", "0.3"]}[mode]
    proc = train(model_dirs("qwen2"), out, "--max_steps", "14", "--val_size", "0.25", "--early_stopping_patience",
                 "2", *flags)
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
    best = Path(state["best_model_checkpoint"])
    last = out / f"checkpoint-{state['global_step']}"
    assert state["global_step"] < 14, evals  # stopped early
    assert best != last and state["best_metric"] == min(evals) < evals[-1]
    saved, at_best, at_last = (load_file(str(weights_file(f))) for f in (out, best, last))
    assert all((saved[k] == at_best[k]).all() for k in saved)  # the best weights were loaded before the final save
    assert any(not (saved[k] == at_last[k]).all() for k in saved)
    assert f"best eval loss {min(evals):.4f} (the saved model is {best.name}, stopped early at step" in proc.stderr

    held_out = conversations(out / "val.jsonl")
    assert len(held_out) == 3 and len(json.loads((out / "val_ids.json").read_text())) == 3
    report = json.loads((out / "run_report.json").read_text())
    assert report["eval_data"]["conversations"] == 3 and report["data"]["conversations"] == 10
    assert report["data"]["files"] == [str(EXAMPLES / "sharegpt.json")]
    train_part = {str(c) for c in conversations(EXAMPLES / "sharegpt.json")} - {str(c) for c in held_out}
    assert len(train_part) == 10

    for folder in (out, best, last):
        png = (folder / "loss.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000, folder

    # a checkpoint is as complete as the result for the later steps: the trained stops and chattune.json in it,
    # and its run's held-out conversations found (and carried by merge / GPTQ) through it
    for folder in (best, last):
        assert run_info(str(folder)) == run_info(str(out)) != {}
        assert (json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
                == json.loads((out / "generation_config.json").read_text())["eos_token_id"])
        assert held_out_of(folder) == out / "val.jsonl"
    merged = tmp_path / "from-checkpoint"
    if mode == "lora":  # the user's path: merge_lora.py on a checkpoint folder
        forkrun.script("merge_lora.py", "--adapter_path", best, "--output_path", merged)
        assert run_info(str(merged))["stop_tokens"] == run_info(str(out))["stop_tokens"]
        assert (json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
                == json.loads((out / "generation_config.json").read_text())["eos_token_id"])
    else:
        merged.mkdir()
        carry_held_out(best, merged)
    assert (merged / "val.jsonl").read_bytes() == (out / "val.jsonl").read_bytes()


def test_loss_plot_draws_training_and_evaluation_loss(tmp_path):
    from chattune.train.callbacks import plot_loss

    assert not plot_loss([{"learning_rate": 1e-3, "step": 1}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    history = [{"loss": 2.0 - 0.1 * s, "learning_rate": 1e-3, "step": s} for s in range(1, 9)]
    history += [{"eval_loss": 1.9 - 0.05 * s, "step": s} for s in (2, 4, 6, 8)]
    assert plot_loss(history, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_copies_of_a_held_out_conversation_are_not_trained(tmp_path):
    """Scraped data repeats itself: every copy of a held-out conversation stays out of training (counted), or the
    held-out loss would be measured on trained conversations."""
    data = tmp_path / "d.jsonl"
    write_jsonl(tmp_path / "ten.jsonl", 10)
    data.write_text((tmp_path / "ten.jsonl").read_text() * 5)  # 50 records, 10 distinct conversations
    split = split_data(str(data), 0.2, seed=7, cache_dir=tmp_path / "cache")
    train, val = conversations(split.train), conversations(split.val)
    assert len(val) == 10 and not {str(c) for c in train} & {str(c) for c in val}
    assert split.copies_left_out == 50 - 10 - len(train) > 0
    names = split.train_sources.read_text().splitlines()
    assert len(names) == len(train) and all(n.startswith(f"{data}: line ") for n in names)


@pytest.mark.slow
def test_with_val_size_errors_name_the_users_file_and_record(tmp_path, model_dirs, capsys):
    import finetune

    data = write_jsonl(tmp_path / "ctl.jsonl", 20)
    with data.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "say <|im_end|> now"},
                                         {"role": "assistant", "content": "no"}]}) + "\n")
    with pytest.raises(SystemExit) as e:
        finetune.main(["--model_name_or_path", str(model_dirs("qwen2")), "--data_path", str(data), "--val_size", "2",
                       "--seed", "1", "--data_cache_dir", str(tmp_path / "cache"), "--dump_tokenized",
                       str(tmp_path / "t.jsonl"), "--output_dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{data}: line 21" in err and "splits" not in err.split("error: ", 1)[1], err[-2000:]


def test_resuming_with_another_held_out_split_is_refused(tmp_path, model_dirs):
    from chattune.data.split import publish

    data = write_jsonl(tmp_path / "d.jsonl", 30)
    out = tmp_path / "run"
    publish(split_data(str(data), 5, seed=0, cache_dir=tmp_path / "cache"), out)
    publish(split_data(str(data), 5, seed=0, cache_dir=tmp_path / "cache"), out)  # the same split: fine
    other = split_data(str(data), 5, seed=1, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="holds another held-out split than this run makes"):
        publish(other, out)
    publish(other, out, overwrite=True)
    assert (out / "val.jsonl").read_bytes() == other.val.read_bytes()
