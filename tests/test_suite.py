"""The test suite's own set-up: what keeps `pytest -n 2` quick holds in the installed pytest and pytest-xdist."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GROUPED = '''
import os
import pytest

pytestmark = pytest.mark.xdist_group("one")


@pytest.fixture(scope="module")
def built():
    with open("builds", "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")


@pytest.mark.parametrize("i", range(8))
def test_uses_it(built, i):
    pass
'''


def test_an_xdist_group_runs_in_one_process_and_builds_its_module_fixture_once(tmp_path):
    """pytest.ini's --dist loadgroup keeps each grouped module (test_deploy, test_gptq, test_qwen35) in one process;
    pytest 9.2 with pytest-xdist 3.8 spreads them over both and builds each fixture twice (pytest-xdist#1386:
    requirements-test.txt pins pytest)."""
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "test_other.py").write_text("import pytest\n\n@pytest.mark.parametrize('i', range(8))\n"
                                            "def test_other(i):\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-c", str(ROOT / "pytest.ini"),
                           "--rootdir", str(tmp_path), "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "16 passed" in proc.stdout
    assert len((tmp_path / "builds").read_text().split()) == 1


def test_test_processes_share_the_cores_instead_of_each_taking_all():
    """conftest.py gives each of N test processes (and the programs it starts) its share of the cores."""
    import os

    import pytest
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers == 1:
        pytest.skip("one test process: it may use every core")
    assert torch.get_num_threads() * workers <= max(os.cpu_count() or 1, workers)
    assert os.environ["OMP_NUM_THREADS"] == str(torch.get_num_threads())  # the programs tests start get it too
