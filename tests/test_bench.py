"""The benchmarks run (smoke, tiny shapes on CPU): timing targets live in their printed tables, not in tests."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import forkrun
import pytest

from bench.throughput import (
    COLUMNS,
    SidePlan,
    Suite,
    last_error_line,
    plan_side,
    table_row,
)

ROOT = Path(__file__).resolve().parents[1]


def run_throughput(*flags: str) -> subprocess.CompletedProcess:
    return forkrun.run(["bench/throughput.py", "--tiny", "--runs", "lora-7b", *flags], timeout=300)


def table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        if line.startswith(("| baseline", "| anchor", "| chattune")):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow
def test_throughput_bench_runs_each_side_in_its_own_process():
    proc = run_throughput("--steps", "3", "--warmup", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert set(rows) == {"baseline", "anchor", "chattune"}, proc.stdout
    # side | tokens/micro-batch | recompute | attention | loss | Liger kernels | real tokens/s | MFU | allocated GB |
    # reserved GB | estimate GB | first loss | last loss
    assert rows["baseline"][1:6] == ["padded", "all layers", "sdpa", "logits + CE", "no"]  # Qwen's recipe, no Liger
    assert rows["anchor"][1:5] == ["1,024", "all layers", "sdpa", "chunked"]  # the anchors' budget (tiny: 1,024)
    assert rows["chattune"][1:5] == ["512", "off", "sdpa", "chunked"]  # CPU: no GPU memory to plan for or save
    for cells in rows.values():
        assert float(cells[6].replace(",", "")) > 0  # real tokens/s measured
        assert float(cells[10]) > 0  # the planner's estimate beside it
        assert math.isfinite(float(cells[11])) and math.isfinite(float(cells[12]))
    # the same samples in every optimizer step: the same losses
    assert rows["baseline"][11] == rows["anchor"][11] == rows["chattune"][11]
    pids = re.search(r"processes: baseline pid (\d+), anchor pid (\d+), chattune pid (\d+)", proc.stdout)
    assert pids and len({pids[1], pids[2], pids[3]}) == 3, proc.stdout
    assert ("baseline: 2 sample(s) per micro-batch (Qwen's per_device_train_batch_size) padded to 256, 8 micro-batches "
            "per optimizer step") in proc.stdout
    assert "anchor: packed micro-batches of <= 1024 tokens, " in proc.stdout
    assert "chattune: packed micro-batches of <= 512 tokens, " in proc.stdout


@pytest.mark.slow
def test_throughput_bench_reports_a_side_past_its_timeout_and_goes_on():
    proc = run_throughput("--steps", "3", "--warmup", "1", "--timeout", "1")
    assert proc.returncode == 1
    rows = table_rows(proc.stdout)
    assert rows["baseline"][3] == rows["anchor"][3] == rows["chattune"][3] == "timed out after 1 s"
    assert "speed-up: n/a (the baseline did not finish)" in proc.stdout


def test_throughput_bench_starts_no_side_past_its_deadline():
    proc = run_throughput("--steps", "3", "--warmup", "1", "--deadline", "5")
    assert proc.returncode == 1
    rows = table_rows(proc.stdout)
    assert [rows[s][3] for s in ("baseline", "anchor", "chattune")] == ["skipped: --deadline 5 s reached"] * 3
    assert "lora-7b: baseline ..." not in proc.stderr  # no child started


def test_sides_get_the_same_samples_per_step_and_their_budgets():
    suite = Suite("t", "lora", "tiny", max_length=512, batch_size=2, anchor_tokens=2048)
    lengths = [100] * 32  # 16 per step: 10 per 1024-token bin (bins of 10, 6), all 16 in one 2048-token bin
    baseline = plan_side(suite, "baseline", lengths, cuda=True, gpu_memory_gb=80)
    assert (baseline.side, baseline.attention, baseline.fused_ce, baseline.liger, baseline.packed_tokens,
            baseline.accumulation, baseline.real_tokens_per_step, baseline.recompute_every) == (
        "baseline", "sdpa", "none", False, 0, 8, 1600.0, 1)
    anchor = plan_side(suite, "anchor", lengths, cuda=True, gpu_memory_gb=80)
    assert (anchor.attention, anchor.fused_ce, anchor.liger, anchor.packed_tokens, anchor.accumulation,
            anchor.real_tokens_per_step, anchor.recompute_every, anchor.optim) == (
        "flex_attention", "auto", True, 2048, 1, 1600.0, 1, "adamw_torch")
    ours = plan_side(suite, "chattune", lengths, cuda=True, gpu_memory_gb=80)
    # a tiny model on an 80 GB GPU: the planner's largest budget, no recompute, fused AdamW
    assert (ours.packed_tokens, ours.accumulation, ours.recompute_every, ours.optim) == (
        16384, 1, 0, "adamw_torch_fused")
    assert plan_side(suite, "chattune", lengths, cuda=False).attention == "sdpa"
    small = plan_side(suite, "chattune", lengths, cuda=False)  # no GPU: the padded worst case, no recompute
    assert (small.packed_tokens, small.accumulation, small.recompute_every, small.optim) == (
        1024, 2, 0, "adamw_torch")


def test_real_suites_use_the_anchor_budgets_and_the_planner_on_an_80gb_gpu():
    from bench.throughput import (
        SUITES,
        model_shape,
        planner_setup,
        sample_count,
        synthetic_lengths,
    )
    from chattune.train.memory import GB, estimate

    assert [SUITES[n].anchor_tokens for n in ("full-1.5b", "lora-7b", "qlora-7b")] == [8192, 4096, 4096]
    suite = SUITES["qlora-7b"]
    lengths = synthetic_lengths(sample_count(4), suite)
    ours = plan_side(suite, "chattune", lengths, cuda=True, gpu_memory_gb=79.2)
    # the largest budget whose estimate fits 90% of the GPU, with the least recompute that fits
    assert ours.estimate_gb <= 0.9 * 79.2
    assert ours.estimate_gb == pytest.approx(estimate(model_shape(suite), planner_setup(
        suite, ours.packed_tokens, ours.recompute_every, ours.offload, True, True))["total"] / GB)
    assert "planned for this machine (79 GB GPU)" in ours.why


def test_failed_side_row_keeps_the_table_shape():
    stderr = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: a | b\n\n"
    assert last_error_line(stderr, 1) == "ValueError: a | b"
    assert last_error_line("", -9) == "exit code -9, nothing on stderr"
    plan = SidePlan("baseline", "sdpa", "none", liger=False, packed_tokens=0, accumulation=8, real_tokens_per_step=1.0)
    row = table_row({"side": "baseline", "error": "failed: ValueError: a | b"}, plan, flops_per_token=1.0)
    assert row == "| baseline | padded | all layers | failed: ValueError: a / b |" + "  |" * 9
    assert row.count("|") == len(COLUMNS) + 1


@pytest.mark.slow
def test_prepare_speed_bench_runs(model_dirs):
    proc = subprocess.run([sys.executable, "bench/prepare_speed.py", "--model_name_or_path", str(model_dirs("qwen2")),
                           "--n", "300"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if re.match(r"\| [\d,]+ \| \d+-\d+ \|", line)]
    assert [(row[1], row[3]) for row in rows] == [("1-3", "cold"), ("1-3", "cached"), ("5-10", "cold"),
                                                  ("5-10", "cached")]
    for cold, cached in (rows[:2], rows[2:]):
        assert float(cold[7]) > 0 and cached[7] == "-"  # CPU seconds per million tokens only where tokenizing
        assert cold[4] == cached[4] and float(cold[6]) > 0  # the same tokens, from the cache the second time
    assert all(float(row[8].replace(",", "")) > 100 for row in rows)  # peak MB of the main process, measured


def test_read_speed_bench_runs():
    proc = subprocess.run([sys.executable, "bench/read_speed.py", "--n", "300"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"\| JSONL, chattune \(read \+ validate\) \| [\d.]+ \| [\d,]+ \|", proc.stdout), proc.stdout


@pytest.mark.slow
def test_qwen35_row_packs_the_same_steps_as_the_padded_baseline():
    """The Qwen3.5 (Gated DeltaNet) row on CPU: packed against padded, the same samples per optimizer step, so the
    same losses (the row's timing value is on a GPU)."""
    proc = forkrun.run(["bench/throughput.py", "--tiny", "--runs", "lora-qwen3.5", "--steps", "3", "--warmup", "1"],
                       timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert rows["chattune"][3] == "sdpa" and rows["baseline"][5] == rows["chattune"][5] == "no"
    first, last = {s: float(r[11]) for s, r in rows.items()}, {s: float(r[12]) for s, r in rows.items()}
    for side in ("anchor", "chattune"):
        assert first["baseline"] == pytest.approx(first[side], rel=1e-4)
        assert last["baseline"] == pytest.approx(last[side], rel=1e-3)


@pytest.mark.slow
def test_experts_bench_times_each_implementation_and_they_agree():
    proc = forkrun.run(["bench/experts.py", "--tiny"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                          for line in proc.stdout.splitlines() if line.startswith("| ")
                                          and not line.startswith(("| implementation", "|---")))}
    assert set(rows) == {"grouped_mm", "batched_mm", "eager", "nf4"}, proc.stdout
    nf4 = rows.pop("nf4")
    for cells in rows.values():
        assert float(cells[1]) > 0 and float(cells[4]) < 1e-5  # timed; the same output as the loop over experts
    assert float(nf4[1]) > 0 and 0 < float(nf4[4]) < 1e-2  # the 4-bit experts: close, not equal (quantized)


def test_gpu_check_bounds_every_step_logs_each_and_says_what_it_skipped(tmp_path):
    """bench/gpu_check.sh on this CPU machine: the versions against our pins pass, the CUDA probe fails, every CUDA
    step is skipped with why, and the table says so; with no time left nothing starts."""
    import os

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "logs")], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # no GPU: the check fails
    table = (tmp_path / "logs" / "table.md").read_text()
    assert table in proc.stdout
    rows = {cells[0]: cells[1] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                             for line in table.splitlines()[3:] if line.startswith("| "))}
    assert rows["versions"] == "passed" and "every package within our pins" in (tmp_path / "logs" /
                                                                              "versions.log").read_text()
    assert rows["cuda"].startswith("FAILED (exit 1): no CUDA GPU")
    assert [rows[s] for s in ("kernels", "full_finetune", "throughput", "experts", "dpo")] == \
        ["skipped: no CUDA GPU"] * 5
    late = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "late")], capture_output=True, text=True,
                          cwd=ROOT, env={**env, "DEADLINE": "-100"}, timeout=120)
    assert late.returncode == 1 and "| versions | skipped: no time left (DEADLINE=-100) |" in late.stdout
    assert "| kernels | skipped: no time left" in late.stdout  # not blamed on the GPU it never probed
    assert not (tmp_path / "late" / "versions.log").exists()


@pytest.mark.slow
def test_dpo_bench_runs_each_side_in_its_own_process_and_says_when_trl_is_missing():
    """CPU smoke run (no timing value): chattune's side trains and times its steps; TRL, absent here, gets a row
    saying so. On a GPU: python bench/dpo_vs_trl.py --shape 0.5b (test_gpu.py)."""
    import importlib.util

    proc = forkrun.run([str(ROOT / "bench" / "dpo_vs_trl.py"), "--tiny"], timeout=900,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in proc.stdout.splitlines() if line.startswith("| "))}
    assert float(rows["chattune"][1]) > 0 and float(rows["chattune"][3].replace(",", "")) > 0
    if importlib.util.find_spec("trl") is None:
        assert rows["trl"][4] == "trl not installed (pip install trl)"
    else:
        assert float(rows["trl"][1]) > 0
