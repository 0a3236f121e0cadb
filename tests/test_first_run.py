"""A first run as a new user makes it: an unreachable hub, wrong output paths, a quiet console (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chattune.hub import model_source_problem

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_hub(monkeypatch):
    """Online mode, with the hub endpoint a closed local port: what an air-gapped node sees."""
    import huggingface_hub.constants as constants

    from fixtures import free_port

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    port = free_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    return port


def test_unreachable_hub_names_the_fix(no_hub):
    problem = model_source_problem("Qwen/Qwen2.5-0.5B-Instruct")
    assert problem.startswith(f"--model_name_or_path Qwen/Qwen2.5-0.5B-Instruct: not a local directory, and the "
                              f"Hugging Face hub 127.0.0.1:{no_hub} cannot be reached")
    assert "Pass the path of a local model directory" in problem and "HF_HUB_OFFLINE=1" in problem
    assert model_source_problem("./not/here").endswith("no such directory (a local model is a directory with "
                                                       "config.json)")


def test_unreachable_hub_uses_the_cached_copy(no_hub, tmp_path):
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    assert model_source_problem("org/tiny", cache_dir=str(tmp_path)) is None
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_cli_unreachable_hub_is_one_error_line(no_hub, tmp_path):
    env = dict(os.environ, CHATTUNE_CPU="1")
    out = subprocess.run([sys.executable, "finetune.py", "--model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct",
                          "--data_path", "examples/sharegpt.json", "--output_dir", str(tmp_path / "out"),
                          "--use_cpu", "True"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "not a local directory, and the Hugging Face hub 127.0.0.1" in out.stderr


@pytest.mark.parametrize("case", ["directory", "missing-folder"])
def test_dump_tokenized_path_checked_first(tmp_path, case, model_dirs):
    target = tmp_path if case == "directory" else tmp_path / "nope" / "tokens.jsonl"
    out = subprocess.run([sys.executable, "finetune.py", "--model_name_or_path", str(model_dirs("qwen2")),
                          "--data_path", "examples/sharegpt.json", "--dump_tokenized", str(target)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    expected = ("is a directory; give the path of a file to write" if case == "directory"
                else f"its directory {tmp_path / 'nope'} does not exist; create it first")
    assert f"--dump_tokenized {target}: {expected}" in out.stderr


def test_eval_data_with_nothing_kept_is_an_error_before_training(tmp_path, model_dirs):
    long_prompt = {"conversations": [{"from": "human", "value": "word " * 300}, {"from": "gpt", "value": "ok"}]}
    (tmp_path / "eval.jsonl").write_text(json.dumps(long_prompt) + "\n")
    out = subprocess.run([sys.executable, "finetune.py", "--model_name_or_path", str(model_dirs("qwen2")),
                          "--data_path", "examples/sharegpt.json", "--eval_data_path", str(tmp_path / "eval.jsonl"),
                          "--model_max_length", "64", "--output_dir", str(tmp_path / "out"), "--use_cpu", "True",
                          "--data_cache_dir", str(tmp_path / "cache")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert ("error: no evaluation sample has a trained token left after truncation to 64 tokens (every answer starts "
            "beyond it); raise --model_max_length") in out.stderr
    assert not list((tmp_path / "cache").rglob("*.arrow"))
