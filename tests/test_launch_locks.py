"""A stale DeepSpeed build lock (a build killed midway) is named with the fix instead of hanging every run."""

import os
import subprocess
import time

import pytest

from chattune.errors import ConfigError
from chattune.launch import stale_build_locks
from chattune.train.args import parse_args


@pytest.fixture
def extensions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    build = tmp_path / "ext" / "py311_cpu" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    lock = build / "lock"
    lock.write_text("")
    old = time.time() - 600
    os.utime(lock, (old, old))
    return build, lock


def test_a_lock_nobody_holds_is_stale_and_a_live_build_is_not(extensions):
    build, lock = extensions
    assert stale_build_locks() == [str(lock)]
    builder = subprocess.Popen(["sleep", "30"], cwd=build)  # a live build runs ninja in that directory
    try:
        time.sleep(0.2)
        assert stale_build_locks() == []
    finally:
        builder.kill()
        builder.wait()
    os.utime(lock)  # a fresh lock: a build that may just have started
    assert stale_build_locks() == []


def test_a_deepspeed_run_is_refused_with_the_fix(extensions, tmp_path):
    _, lock = extensions
    argv = ["--model_name_or_path", str(tmp_path), "--data_path", "examples/sharegpt.json", "--output_dir",
            str(tmp_path / "out"), "--use_cpu", "True"]
    message = rf"--deepspeed: {lock} is the lock of an op build that was killed .*\(rm {lock}\) and run again"
    with pytest.raises(ConfigError, match=message):
        parse_args([*argv, "--deepspeed", "ds_configs/zero2.json"])
    parse_args(argv)  # no DeepSpeed, no op build: nothing to say
