import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Tests never reach the hub: everything is built offline in fixtures.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test processes (pytest -n N) share the machine's cores: each, and the programs it starts, gets its share of threads.
# torch's OpenMP threads spin while they wait, so N processes each running a thread per core slow each other down
# (on 2 cores with -n 2: tests that train in-process ran 17% faster with one thread each). torchrun already starts
# its ranks with one thread each.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

from fixtures import build_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Lazily built tiny model directories, one per family, shared by the whole session."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("models")

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_model(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="module")
def model(model_dirs):
    """The tiny Qwen2 in float32 with sdpa and no KV cache (packed rows need it off), one per test module: tests may
    switch its attention implementation and set it back."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2"), dtype=torch.float32, attn_implementation="sdpa")
    m.config.use_cache = False
    return m


def pytest_sessionstart(session):
    """A DeepSpeed op build killed in an earlier run leaves a lock that would hang this run's distributed tests:
    remove such locks first (chattune itself refuses with the fix, tests/test_launch_locks.py)."""
    from chattune.launch import stale_build_locks

    for lock in stale_build_locks():
        os.remove(lock)
        print(f"removed a stale op-build lock left by a killed process: {lock}")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
