"""Liger's fused linear+CE, the CUDA default, runs in CI on CPU under the Triton interpreter (tests/liger_on_cpu.py in
a fresh process: TRITON_INTERPRET must be set before triton is imported anywhere)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("liger_kernel")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_liger_loss_and_gradients_equal_the_models_own_through_the_trainer(family):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "liger_on_cpu.py"), family], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    # gemma2: soft-capped logits (final_logit_softcapping 3): Liger gets the cap, or its loss would be far off
    assert result["liger"] == pytest.approx(result["own"], rel=1e-5)
    assert result["chunked"] == pytest.approx(result["own"], rel=1e-5)
    assert result["liger_grad_error"] < 1e-4 and result["chunked_grad_error"] < 1e-4
    # a micro-batch without a trained token: zero loss, zero (not NaN) gradient on the output layer
    assert result["empty"] == {"loss": 0.0, "head_grad_zero": True}
