"""A real full disk: a small tmpfs (CI runs as root) under the output directory and the data cache. The failures are
the ones the libraries really raise there (safetensors' SafetensorError, torch.save's RuntimeError without errno, a
Python OSError), not an injected exception: each save fails, is reported in one line, leaves no partial files, and
loses no trained weights."""

import errno
import subprocess
from pathlib import Path

import pytest
from test_checkpoints import argv, losses

from chattune.data.cache import DATASET_FILE
from chattune.data.problems import DataError
from chattune.train import checkpoints
from chattune.train.args import parse_args
from chattune.train.run import run
from chattune.train.trainer import SaveError

FULL = ["--use_lora", "False", "--learning_rate", "1e-4"]


@pytest.fixture
def small_disk(tmp_path):
    """`make(megabytes)`: a directory on a fresh tmpfs of that size, unmounted after the test."""
    mounts = []

    def make(megabytes: float) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def rescue_root(tmp_path, monkeypatch):
    import tempfile

    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def files_in(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_write_failure_reads_what_the_libraries_raise_on_a_full_disk(model_dirs, small_disk):
    """The exceptions themselves, from a real 1 MB filesystem: none of safetensors', tokenizers' and torch.save's
    is an OSError."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    disk = small_disk(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dirs("qwen2"))
    with pytest.raises(Exception) as tokenizer_error:
        tokenizer.save_pretrained(disk / "tokenizer")
    with pytest.raises(Exception) as safetensors_error:
        save_file({"w": torch.zeros(1 << 20)}, str(disk / "w.safetensors"))
    with pytest.raises(Exception) as torch_error:
        torch.save({"w": torch.zeros(1 << 20)}, disk / "w.pt")
    for raised in (safetensors_error.value, torch_error.value, tokenizer_error.value):
        assert not isinstance(raised, OSError)
        found = checkpoints.write_failure(raised, str(disk))
        assert found is not None and found.errno == errno.ENOSPC, raised
    assert checkpoints.write_failure(RuntimeError("shapes do not match"), str(disk)) is None  # a bug propagates
    assert checkpoints.write_failure(OSError(errno.ENOENT, "gone"), str(disk)) is None


@pytest.mark.slow
def test_full_fine_tuning_on_a_full_disk_saves_the_result_elsewhere(model_dirs, tmp_path, small_disk, rescue_root,
                                                                     capsys):
    """The model (39 MB of weights) does not fit a 20 MB disk: every checkpoint fails inside safetensors (reported,
    partial files removed, training goes on), the final save fails too and the result goes to the rescue directory,
    whole and loadable. The output directory is left without anything that looks like a model."""
    import torch
    from transformers import AutoModelForCausalLM

    out = small_disk(20) / "run"
    with pytest.raises(SaveError) as e:
        run(*parse_args(argv(model_dirs("qwen2"), out, *FULL, "--max_steps", 4)))
    err = capsys.readouterr().err
    for step in (2, 4):
        assert f"error: checkpoint-{step} could not be saved in {out}: No space left on device" in err
    rescued = next(rescue_root.glob("chattune-rescued-run-*"))
    assert f"could not be written to {out} (No space left on device): it was saved to {rescued} instead" in str(e.value)
    assert not checkpoints.committed(str(out)) and not (out / checkpoints.STAGING).exists()
    assert not [name for name in files_in(out) if "safetensors" in name or name == "config.json"], files_in(out)
    model = AutoModelForCausalLM.from_pretrained(rescued)
    base = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"))
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


@pytest.mark.slow
def test_full_fine_tuning_checkpoint_that_fills_the_disk_in_the_optimizer_state(model_dirs, small_disk, capsys):
    """60 MB: the weights of a checkpoint fit, its optimizer state (torch.save, 78 MB) does not. The checkpoint is
    removed, training goes on, and the result (39 MB + tokenizer) is saved in the output directory."""
    out = small_disk(60) / "run"
    run(*parse_args(argv(model_dirs("qwen2"), out, *FULL, "--max_steps", 2)))
    err = capsys.readouterr().err
    assert f"error: checkpoint-2 could not be saved in {out}: No space left on device" in err
    assert not checkpoints.committed(str(out)) and not (out / checkpoints.STAGING).exists()
    assert (out / "model.safetensors").is_file() and sorted(losses(out)) == [1, 2]


@pytest.mark.slow
def test_lora_on_a_full_disk_keeps_training_and_rescues_the_adapter(model_dirs, small_disk, rescue_root, capsys):
    """A LoRA run whose disk is full to 200 kB: checkpoints and the final save fail writing the tokenizer (11 MB,
    tokenizers' bare Exception "... (os error 28)"), the adapter is rescued."""
    disk = small_disk(2)
    (disk / "filler").write_bytes(b"\0" * (2 * 1024 * 1024 - 200 * 1024))
    out = disk / "run"
    with pytest.raises(SaveError) as e:
        run(*parse_args(argv(model_dirs("qwen2"), out, "--max_steps", 2)))
    assert f"error: checkpoint-2 could not be saved in {out}" in capsys.readouterr().err
    rescued = next(rescue_root.glob("chattune-rescued-run-*"))
    assert str(rescued) in str(e.value)
    assert (rescued / "adapter_model.safetensors").is_file() and (rescued / "adapter_config.json").is_file()
    assert not (out / "adapter_model.safetensors").exists() and not checkpoints.committed(str(out))


def test_a_full_data_cache_is_one_clear_error_and_leaves_no_entry(model_dirs, tmp_path, small_disk):
    """The tokenized data does not fit its cache: a DataError naming the cache, the flag to change and the space, and
    no entry (ready or half written) left behind to be loaded by the next run."""
    from chattune.data.prepare import prepare_files
    from chattune.data.tokenizer import prepare_tokenizer

    cache = small_disk(0.25)
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(3000):
            f.write('{"conversations": [{"from": "human", "value": "q%d why why why"}, '
                    '{"from": "gpt", "value": "a%d so so so so so so so so so so so"}]}\n' % (i, i))
    tok, setup = prepare_tokenizer(str(model_dirs("qwen2")), "auto")
    with pytest.raises(DataError) as e:
        prepare_files(str(data), tok, stop_tokens=setup.stop_tokens, max_length=64, cache_dir=cache, num_proc=1)
    message = str(e.value)
    assert str(cache) in message and "No space left on device" in message and "--data_cache_dir" in message
    assert not list(cache.rglob(DATASET_FILE)), files_in(cache)
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")], files_in(cache)
