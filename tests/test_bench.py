"""The benchmarks run (smoke, tiny shapes on CPU): timing targets live in their printed tables, not in tests."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_bench_prints_both_sides():
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--tiny", "--steps", "3", "--warmup", "1",
                           "--runs", "lora-7b,full-1.5b"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| baseline", "| chattune"))]
    assert len(rows) == 4
    assert all(float(r.split("|")[4].replace(",", "")) > 0 for r in rows)  # real tokens/s measured
    assert "| chattune | sdpa | chunked |" in proc.stdout


def test_prepare_speed_bench_runs(model_dirs):
    proc = subprocess.run([sys.executable, "bench/prepare_speed.py", "--model_name_or_path", str(model_dirs("qwen2")),
                           "--n", "300"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tokenize (cached re-run)" in proc.stdout
