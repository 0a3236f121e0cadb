"""The test suite's own set-up: what keeps `pytest -n 2` quick holds in the installed pytest and pytest-xdist."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


PROBE = '''
import atexit, json, os, sys
atexit.register(lambda: print("atexit ran", flush=True))
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "probe": os.environ.get("CHATTUNE_PROBE"),
                  "path0": sys.path[0], "main": __name__}))
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "exit":
    sys.exit(int(sys.argv[2]))
if how == "message":
    sys.exit("a message")
if how == "raise":
    raise ValueError("boom")
'''


@pytest.mark.parametrize("how, args", [("end", []), ("exit", ["3"]), ("exit", ["0"]), ("message", []),
                                       ("raise", [])])
def test_forked_scripts_run_as_real_processes_do(tmp_path, how, args):
    """tests/forkrun.py (the tests' way to run finetune.py, merge_lora.py, ...) gives what `python script.py` gives:
    the same stdout, stderr, exit code, argv, working directory, environment and atexit handlers."""
    import forkrun

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = dict(os.environ, CHATTUNE_PROBE="seen")
    real = subprocess.run([sys.executable, str(script), how, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    forked = forkrun.run([str(script), how, *args], cwd=tmp_path, env=env)
    assert forkrun._server.get("path")  # it really went through the server
    assert (forked.returncode, forked.stdout) == (real.returncode, real.stdout)
    assert forked.stderr.splitlines()[0] == real.stderr.splitlines()[0] == "to stderr"
    assert forked.stderr.splitlines()[-1] == real.stderr.splitlines()[-1]  # the message, or the exception's line
    assert json.loads(forked.stdout.splitlines()[0])["probe"] == "seen"


def test_a_changed_import_time_variable_gets_a_real_process(tmp_path):
    """A variable the preloaded libraries read while importing (HF_HUB_OFFLINE, ...) cannot change in a fork."""
    import forkrun

    script = tmp_path / "pid.py"
    script.write_text("import os; print(os.getppid())")
    forkrun._start()
    started = forkrun._server["env"]  # (other tests may have changed os.environ since the server started)
    forked = forkrun.run([str(script)], cwd=tmp_path, env=started)
    own = forkrun.run([str(script)], cwd=tmp_path, env=dict(started, HF_HUB_OFFLINE="0"))
    assert int(forked.stdout) == forkrun._server["process"].pid  # the server's child
    assert int(own.stdout) == os.getpid()  # this test process's own child
