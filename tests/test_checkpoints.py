"""Nothing lost when the machine fails: checkpoints are committed atomically, a broken one is moved aside and the run
resumes from the one before it (with the losses of an uninterrupted run), a full disk is reported and survived, and
a final save that fails is written where it fits."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import forkrun
import pytest
import torch

from chattune.errors import ConfigError
from chattune.train import checkpoints
from chattune.train.args import parse_args
from chattune.train.run import run

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "sharegpt.json"
COMMON = ["--use_lora", "--lora_r", "8", "--learning_rate", "1e-2", "--save_strategy", "steps", "--save_steps", "2",
          "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "4", "--logging_steps", "1",
          "--use_cpu", "True", "--report_to", "none", "--preview_data", "0", "--seed", "0"]
PACKED = ["--packing", "true", "--max_tokens_per_batch", "256", "--model_max_length", "256"]


def argv(model_dir, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--data_path", str(DATA), "--output_dir", str(out),
            "--data_cache_dir", str(out.parent / "cache"), *COMMON, *map(str, extra)]


def train(model_dir, out, *extra):
    return run(*parse_args(argv(model_dir, out, *extra)))


def losses(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


# --------------------------------------------------------------------------------------------------------------
# The pieces, on literal directories
# --------------------------------------------------------------------------------------------------------------


def fake_checkpoint(path: Path, weights: bytes = b"x" * 100) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, str(path / "adapter_model.safetensors"))
    torch.save({"state": {}}, path / "optimizer.pt")
    (path / "trainer_state.json").write_text("{}")
    return path


def test_manifest_detects_truncated_and_missing_files(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "checkpoint-2")
    checkpoints.write_manifest(str(ckpt))
    assert checkpoints.problem(str(ckpt)) is None
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert checkpoints.problem(str(ckpt)) == f"optimizer.pt has {len(data) // 2:,} bytes, {len(data):,} were written"
    (ckpt / "optimizer.pt").unlink()
    assert checkpoints.problem(str(ckpt)) == "optimizer.pt is missing"


def test_checkpoints_without_a_manifest_are_checked_structurally(tmp_path):
    """Written by an older release (or another tool): safetensors headers and torch zip directories are checked."""
    ckpt = fake_checkpoint(tmp_path / "checkpoint-2")
    assert checkpoints.problem(str(ckpt)) is None
    weights = ckpt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    assert checkpoints.problem(str(ckpt)).startswith("adapter_model.safetensors is damaged (")
    ckpt2 = fake_checkpoint(tmp_path / "checkpoint-3")
    (ckpt2 / "optimizer.pt").write_bytes((ckpt2 / "optimizer.pt").read_bytes()[:30])
    assert checkpoints.problem(str(ckpt2)).startswith("optimizer.pt is damaged (")
    (ckpt2 / "trainer_state.json").unlink()
    assert checkpoints.problem(str(ckpt2)) == "trainer_state.json is missing"


def test_latest_complete_moves_broken_ones_aside_and_rotation_keeps_the_newest(tmp_path):
    from types import SimpleNamespace

    from chattune.train.plan import OutputDir, plan_resume
    from chattune.train.run import tidy

    for step in (2, 4, 6):
        checkpoints.write_manifest(str(fake_checkpoint(tmp_path / f"checkpoint-{step}")))
    (tmp_path / "checkpoint-6" / "optimizer.pt").unlink()
    warnings = []
    args = SimpleNamespace(resume_from_checkpoint=None, overwrite_output_dir=False)
    resume = plan_resume(args, OutputDir.read(str(tmp_path)))
    tidy(resume, warnings.append)
    assert resume.source == str(tmp_path / "checkpoint-4")
    assert len(warnings) == 1 and "checkpoint-6 is incomplete (optimizer.pt is missing)" in warnings[0]
    assert (tmp_path / "broken_checkpoint-6").is_dir() and not (tmp_path / "checkpoint-6").exists()
    assert [s for s, _ in checkpoints.committed(str(tmp_path))] == [2, 4]
    # rotation: never the newest, never a protected one (the best), only complete checkpoint-N directories
    checkpoints.write_manifest(str(fake_checkpoint(tmp_path / "checkpoint-8")))
    deleted = checkpoints.rotate(str(tmp_path), 2, keep={str(tmp_path / "checkpoint-2")})
    assert deleted == [str(tmp_path / "checkpoint-4")]
    assert [s for s, _ in checkpoints.committed(str(tmp_path))] == [2, 8]
    assert (tmp_path / "broken_checkpoint-6").is_dir()  # moved aside, never deleted


# --------------------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("batches, damage", [("padded", "truncate weights"), ("packed", "delete optimizer")])
def test_broken_newest_checkpoint_resumes_from_the_previous_one(model_dirs, tmp_path, capsys, batches, damage):
    model_dir = model_dirs("qwen2")
    extra = PACKED if batches == "packed" else []
    out = tmp_path / "run"
    train(model_dir, out, *extra, "--max_steps", 4)  # checkpoints 2 and 4
    newest = out / "checkpoint-4"
    if damage == "truncate weights":  # what a kill in the middle of writing it leaves
        weights = newest / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (newest / "optimizer.pt").unlink()
    train(model_dir, out, *extra, "--max_steps", 6)  # the same command again, resumed
    err = capsys.readouterr().err
    assert f"WARNING: {newest} is incomplete" in err and f"resuming from {out / 'checkpoint-2'}" in err
    assert (out / "broken_checkpoint-4").is_dir()  # kept for inspection
    ref = tmp_path / "ref"
    train(model_dir, ref, *extra, "--max_steps", 6)
    resumed, reference = losses(out), losses(ref)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor([resumed[s] for s in range(1, 7)]),
                               torch.tensor([reference[s] for s in range(1, 7)]), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_explicit_resume_from_a_broken_checkpoint_says_what_is_missing(model_dirs, tmp_path):
    out = tmp_path / "run"
    train(model_dirs("qwen2"), out, "--max_steps", 2)
    (out / "checkpoint-2" / "scheduler.pt").unlink()
    with pytest.raises(ConfigError, match="checkpoint-2: the checkpoint is incomplete \\(scheduler.pt is missing\\)"):
        train(model_dirs("qwen2"), out, "--max_steps", 4, "--resume_from_checkpoint", out / "checkpoint-2")


DIE_DURING_SAVE = r"""
import os, sys
sys.path.insert(0, {root!r})
import chattune.train.trainer as t
save_rng = t.ChatTrainer._save_rng_state
def die(self, output_dir):  # after the weights and the optimizer, before the RNG state and trainer_state.json
    if self.state.global_step == {step} and self.args.process_index == {rank}:
        os._exit(137)  # as a kill -9 would: nothing after this runs
    return save_rng(self, output_dir)
t.ChatTrainer._save_rng_state = die
import finetune
sys.exit(finetune.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_during_a_save_leaves_no_visible_checkpoint(model_dirs, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "die.py"
    script.write_text(DIE_DURING_SAVE.format(root=str(ROOT), step=4, rank=0))
    proc = forkrun.run([str(script), *argv(model_dirs("qwen2"), out, "--max_steps", 6)])
    assert proc.returncode == 137
    assert [s for s, _ in checkpoints.committed(str(out))] == [2]  # step 4's partial save is not a checkpoint
    assert (out / checkpoints.STAGING / "checkpoint-4" / "optimizer.pt").exists()  # it was cut after the optimizer
    proc = forkrun.run(["finetune.py", *argv(model_dirs("qwen2"), out, "--max_steps", 6)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "an unfinished checkpoint save of an earlier run" in proc.stderr
    assert f"resuming from {out / 'checkpoint-2'}" in proc.stderr
    assert not (out / checkpoints.STAGING).exists() and sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


@pytest.fixture
def disk_full_at(monkeypatch):
    """The optimizer state of the given save (1st, 2nd, ...) hits a full disk, after the weights were written.
    Records, at every save, which checkpoint-N directories exist."""
    import chattune.train.trainer as t

    original = t.ChatTrainer._save_optimizer_and_scheduler
    seen = []

    def save(self, output_dir):
        out = Path(self.args.output_dir)
        seen.append(sorted(p.name for p in out.glob("checkpoint-*")))
        if len(seen) == self.disk_full_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(t.ChatTrainer, "_save_optimizer_and_scheduler", save)

    def at(n):
        monkeypatch.setattr(t.ChatTrainer, "disk_full_at", n, raising=False)
        return seen

    return at


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_is_reported_and_training_goes_on(model_dirs, tmp_path, capsys, disk_full_at):
    """--save_total_limit 1: the save at step 4 fails; checkpoint-2, the last complete one, stays until step 6's
    checkpoint is committed."""
    seen = disk_full_at(2)
    out = tmp_path / "run"
    train(model_dirs("qwen2"), out, "--max_steps", 6, "--save_total_limit", 1)
    err = capsys.readouterr().err
    assert (f"error: checkpoint-4 could not be saved in {out}: No space left on device (~" in err
            and "free); the partial files were removed. Training goes on" in err)
    assert seen == [[], ["checkpoint-2"], ["checkpoint-2"]]  # nothing rotated away before a commit
    assert [s for s, _ in checkpoints.committed(str(out))] == [6]  # the next save worked, then rotation
    assert not (out / checkpoints.STAGING).exists()
    assert (out / "adapter_model.safetensors").exists() and sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


def test_full_disk_stops_the_run_when_asked(model_dirs, tmp_path, disk_full_at):
    from chattune.train.trainer import SaveError

    disk_full_at(1)
    out = tmp_path / "run"
    with pytest.raises(SaveError, match="checkpoint-2 could not be saved .* run the same command again"):
        train(model_dirs("qwen2"), out, "--max_steps", 4, "--stop_on_save_error", "True")
    assert not checkpoints.committed(str(out)) and not (out / checkpoints.STAGING).exists()


def test_a_final_save_that_fails_is_written_where_it_fits(model_dirs, tmp_path, monkeypatch):
    """The trained weights are not lost to a failed write: they go to a rescue directory and the error says where."""
    import tempfile

    import chattune.train.save as t
    from chattune.train.trainer import SaveError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "run"
    original = t.write_result

    def readonly_output(trainer, where, *args):
        if Path(where) == out:
            raise OSError(errno.EROFS, "Read-only file system")
        return original(trainer, where, *args)

    monkeypatch.setattr(t, "write_result", readonly_output)
    with pytest.raises(SaveError) as e:
        train(model_dirs("qwen2"), out, "--max_steps", 2, "--save_strategy", "no")
    rescued = next((tmp_path / "tmp").glob("chattune-rescued-run-*"))
    assert f"could not be written to {out} (Read-only file system): it was saved to {rescued} instead" in str(e.value)
    assert (rescued / "adapter_model.safetensors").exists() and (rescued / "chattune.json").exists()


@pytest.mark.slow
def test_two_rank_zero3_checkpoint_is_all_or_nothing(model_dirs, tmp_path):
    """Rank 1 dies while saving step 2 (after its DeepSpeed shards, before the rest): no checkpoint-2 appears; a
    re-run resumes from checkpoint-1 and finishes."""
    out = tmp_path / "run"
    script = tmp_path / "die.py"
    script.write_text(DIE_DURING_SAVE.format(root=str(ROOT), step=2, rank=1))
    args = argv(model_dirs("qwen2"), out, "--max_steps", 3, "--save_steps", 1, "--deepspeed",
                "ds_configs/zero3.json", "--per_device_train_batch_size", 2)

    assert forkrun.torchrun([str(script), *args]).returncode != 0  # rank 0 is stopped as torchrun stops it
    assert [s for s, _ in checkpoints.committed(str(out))] == [1]
    assert checkpoints.problem(str(out / "checkpoint-1")) is None
    proc = forkrun.torchrun(["finetune.py", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and sorted(losses(out)) == [1, 2, 3]


@pytest.mark.slow
def test_too_little_space_for_the_kept_checkpoints_is_warned_at_the_start(model_dirs, tmp_path, monkeypatch):
    from chattune.train import run as train_module

    monkeypatch.setattr(train_module.checkpoints, "free_bytes", lambda path: 10_000)
    out = tmp_path / "run"
    train(model_dirs("qwen2"), out, "--max_steps", 4, "--save_total_limit", 3)
    notes = json.loads((out / "run_report.json").read_text())["plan"]["notes"]
    assert any(n.startswith(f"WARNING: {out} has 10.0 kB free; 2 checkpoints of ~") for n in notes), notes


@pytest.mark.slow
def test_full_model_checkpoints_carry_the_trained_stops_and_stay_whole(model_dirs, tmp_path):
    """A base whose generation config stops elsewhere than training: every checkpoint of a full fine-tune is written
    with the trained stops and chattune.json, and still matches its manifest (a file rewritten after the commit
    would make the next resume set it aside as broken)."""
    import shutil

    base = tmp_path / "base"  # a base model's files: it ends text with <|endoftext|>, training turns with <|im_end|>
    shutil.copytree(model_dirs("qwen2"), base)
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    config = base / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"eos_token": "<|im_end|>"', '"eos_token": "<|endoftext|>"'))
    out = tmp_path / "full"
    train(base, out, "--max_steps", "2", "--save_steps", "1", "--template", "chatml", "--use_lora", "False")
    result = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert 151645 in result  # <|im_end|>, the template's end of turn
    for step in (1, 2):
        folder = out / f"checkpoint-{step}"
        assert checkpoints.problem(str(folder)) is None, folder
        assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == result
        assert json.loads((folder / "chattune.json").read_text())["stop_tokens"]


_HOLD_OUTPUT_DIR = """
import sys, time
from chattune.train import checkpoints
with checkpoints.owned(sys.argv[1]):
    print("HELD", flush=True)
    time.sleep(600)
"""


def test_a_second_run_into_an_owned_output_dir_is_refused_until_the_first_ends(model_dirs, tmp_path):
    """Two runs into one directory would mix their checkpoints (and each resume the other's): the second is refused
    with who holds it. The lock is the kernel's: a kill -9 of the holder frees the directory."""
    import signal

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_OUTPUT_DIR, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert "HELD\n" in iter(holder.stdout.readline, "")
        with pytest.raises(ConfigError, match=f"--output_dir {out}: another run is writing there \\(pid {holder.pid} "):
            train(model_dirs("qwen2"), out, "--max_steps", 1)
        assert not list(out.glob("checkpoint-*")) and not (out / "adapter_model.safetensors").exists()
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with checkpoints.owned(str(out)):  # free again (a run taking it is every other training test)
        assert f"pid {os.getpid()} on " in (out / checkpoints.OWNER_LOCK).read_text()
    assert not (out / checkpoints.OWNER_LOCK).exists()  # the output directory holds only the run's files


def test_a_lock_file_unlinked_while_waiting_for_it_is_not_the_lock_taken(tmp_path, monkeypatch):
    """A run ending unlinks its lock file. A run that opened that file just before, and locks it just after, holds a
    lock on a file no longer in the directory, while a third run creates the file anew and locks it: both would
    write there. Here the third run comes between the open and the lock (the real file system doing it, not a
    raised error); the lock taken must be on the file the directory holds, so that the third run is refused."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    path = out / checkpoints.OWNER_LOCK
    real_lockf = fcntl.lockf
    third: list[subprocess.Popen] = []

    def lockf_after_the_first_run_ended(f, how, *rest):
        if not third:  # the run before ends (unlinks), a third one starts and holds the new file
            os.unlink(path)
            third.append(subprocess.Popen([sys.executable, "-c", _HOLD_OUTPUT_DIR, str(out)], cwd=ROOT,
                                          stdout=subprocess.PIPE, text=True))
            assert "HELD\n" in iter(third[0].stdout.readline, "")
        return real_lockf(f, how, *rest)

    path.write_text("pid 1 on elsewhere\n")
    monkeypatch.setattr(fcntl, "lockf", lockf_after_the_first_run_ended)
    try:
        with pytest.raises(ConfigError, match="another run is writing there") as refused:
            with checkpoints.owned(str(out)):
                pass
        assert f"(pid {third[0].pid} on " in str(refused.value)  # refused by the third run, not by a stale file
        assert f"pid {third[0].pid} on " in path.read_text()  # whose file is still there
    finally:
        for p in third:
            p.kill()
            p.wait(timeout=60)


def other_weights(model_dir: Path, where: Path) -> Path:
    """A copy of `model_dir` with the same config and shapes and other weights (what a base and its instruct
    variant look like to a loader)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, where)
    tensors = load_file(str(where / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in tensors.items()},
              str(where / "model.safetensors"), metadata={"format": "pt"})
    return where


@pytest.mark.slow
def test_resuming_a_checkpoint_of_another_mode_or_base_is_one_clear_error(model_dirs, tmp_path):
    """The same command again resumes; another mode (full on a LoRA checkpoint) or another base of the same shapes
    would end in a traceback or silently train on top of the wrong weights: each is named before the model loads."""
    out = tmp_path / "run"
    train(model_dirs("qwen2"), out, "--max_steps", 2)
    checkpoint = out / "checkpoint-2"
    assert json.loads((checkpoint / "chattune.json").read_text())["base_fingerprint"]
    with pytest.raises(ConfigError, match=f"{checkpoint} was written by a LoRA run and this run is full fine-tuning"):
        run(*parse_args([*argv(model_dirs("qwen2"), out, "--max_steps", 4), "--use_lora", "False"]))
    other = other_weights(model_dirs("qwen2"), tmp_path / "other-base")
    with pytest.raises(ConfigError, match=f"{checkpoint} was trained from .*, whose weights differ from {other}'s"):
        train(other, out, "--max_steps", 4)
    train(model_dirs("qwen2"), out, "--max_steps", 4)  # the same base and mode: resumed
    assert sorted(losses(out)) == [1, 2, 3, 4]
