"""mpirun launches: rank discovery from MPI, and a real two-process run under mpiexec (MPICH from PyPI)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chattune.launch import launched_by_mpi

ROOT = Path(__file__).resolve().parents[1]


def test_launched_by_mpi_literal():
    assert launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "4"})
    assert launched_by_mpi({"PMI_SIZE": "2", "PMI_RANK": "1"})
    assert not launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "4", "RANK": "0"})  # torchrun already set it
    assert not launched_by_mpi({})


@pytest.mark.slow
def test_mpiexec_two_processes_train_and_save(model_dirs, tmp_path):
    mpiexec = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
    if not Path(mpiexec).exists():
        pytest.skip("no mpiexec (pip install mpich)")
    out = tmp_path / "mpi"
    proc = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, "finetune.py", "--model_name_or_path", str(model_dirs("qwen2")),
         "--data_path", "examples/sharegpt.json", "--output_dir", str(out), "--use_lora", "--max_steps", "2",
         "--use_cpu", "True", "--report_to", "none", "--preview_data", "0", "--save_strategy", "no",
         "--data_cache_dir", str(tmp_path / "cache"), "--per_device_train_batch_size", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "run_report.json").read_text())
    assert report["plan"]["processes"] == 2 and report["steps"] == 2
    assert (out / "adapter_model.safetensors").exists()
