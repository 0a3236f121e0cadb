"""finetune/slurm.sbatch on one machine: fake `srun`/`scontrol` run two "nodes" of one process each on loopback
(CPU, gloo), and a preempted job checkpoints, requeues itself and resumes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "sharegpt.json"

FAKE_SRUN = """#!/usr/bin/env bash
# fake srun: the command once per node, concurrently, with that node's SLURM variables
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((n = 0; n < ${SLURM_NNODES:-1}; n++)); do SLURM_NODEID=$n SLURM_PROCID=$n "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# fake scontrol: hostnames of the fake nodes (all loopback), and requeue requests logged
case "$1 $2" in
    "show hostnames") for ((n = 0; n < ${SLURM_NNODES:-1}; n++)); do echo 127.0.0.1; done ;;
    requeue*) echo "$2" >> "$FAKE_REQUEUE_LOG" ;;
esac
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    venv_bin = Path(sys.executable).parent
    return {
        **os.environ, "PATH": f"{bin_dir}:{venv_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[1-2]", "CHATTUNE_CPU": "1", "GPUS_PER_NODE": "1", "PYTHON": sys.executable,
        "TORCHRUN": str(venv_bin / "torchrun"), "MASTER_PORT": str(free_port()),
        "FAKE_REQUEUE_LOG": str(tmp_path / "requeued"),
    }


def common_args(model_dir, out, cache):
    return ["-m", str(model_dir), "-d", str(DATA), "-o", str(out), "--data_cache_dir", str(cache),
            "--report_to", "none", "--preview_data", "0", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_strategy", "no"]


@pytest.mark.slow
def test_two_nodes_on_loopback_train_together(model_dirs, tmp_path, fake_slurm):
    out = tmp_path / "out"
    env = {**fake_slurm, "SLURM_NNODES": "2", "WRAPPER": "finetune_lora_ds.sh"}
    proc = subprocess.run(["bash", "finetune/slurm.sbatch", *common_args(model_dirs("qwen2"), out, tmp_path / "c"),
                           "--max_steps", "2", "--lora_r", "8"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((out / "run_report.json").read_text())
    assert report["plan"]["processes"] == 2 and report["steps"] == 2  # one process on each of the two "nodes"
    assert (out / "adapter_model.safetensors").exists()
    assert not (tmp_path / "requeued").exists()


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(model_dirs, tmp_path, fake_slurm):
    out = tmp_path / "out"
    env = {**fake_slurm, "SLURM_NNODES": "1", "WRAPPER": "finetune_lora_single_gpu.sh"}
    args = ["bash", "finetune/slurm.sbatch", *common_args(model_dirs("qwen2"), out, tmp_path / "c")]
    proc = subprocess.Popen([*args, "--max_steps", "100000"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while time.time() < deadline and not any("'loss'" in line for line in lines) and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends the batch shell before the time limit (--signal=B:USR1@300)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    log = "".join(lines)
    assert proc.returncode == 0, log[-4000:]
    assert "requeueing job 4242" in log
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.split("-")[1])
    # the requeued job runs the same script again and resumes from that checkpoint
    again = subprocess.run([*args, "--max_steps", str(step + 2)], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert f"resuming from {checkpoints[0]}" in again.stderr + again.stdout
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == step + 2


@pytest.mark.parametrize("wrapper_exit, requeued, exit_code, says", [
    (143, True, 0, "requeueing job 4242"),  # stopped for the scheduler, checkpoint committed
    (0, False, 0, "the run finished"),  # finished before it saw the signal: done, not retrained
    (1, False, 1, "the run failed (exit 1); not requeued"),  # crashed: it would crash again, and no checkpoint was saved
])
def test_only_a_run_stopped_for_the_scheduler_is_requeued(tmp_path, fake_slurm, wrapper_exit, requeued, exit_code,
                                                          says):
    """The signal arrives (the stop file exists) in every case; the wrapper's exit code says what the run did."""
    root = tmp_path / "root"
    (root / "finetune").mkdir(parents=True)
    (root / "finetune" / "fake.sh").write_text(f'touch "$CHATTUNE_STOP_FILE"; exit {wrapper_exit}\n')
    env = {**fake_slurm, "SLURM_NNODES": "1", "WRAPPER": "fake.sh", "CHATTUNE_ROOT": str(root)}
    proc = subprocess.run(["bash", "finetune/slurm.sbatch", "-o", str(tmp_path / "out")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == exit_code and says in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert (tmp_path / "requeued").exists() == requeued
    assert not list((tmp_path / "out").glob(".stop-*"))
