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
    assert forkrun.server_key(env) in forkrun._servers  # it really went through a server
    assert (forked.returncode, forked.stdout) == (real.returncode, real.stdout)
    assert forked.stderr.splitlines()[0] == real.stderr.splitlines()[0] == "to stderr"
    assert forked.stderr.splitlines()[-1] == real.stderr.splitlines()[-1]  # the message, or the exception's line
    assert json.loads(forked.stdout.splitlines()[0])["probe"] == "seen"


def test_a_changed_import_time_variable_gets_a_server_of_its_own(tmp_path, monkeypatch):
    """A variable the preloaded libraries read while importing (HF_HUB_OFFLINE, ...) cannot change in a fork: a run
    with another value is forked from a server started with it; past MAX_SERVERS it gets a real process."""
    import forkrun

    script = tmp_path / "pid.py"
    script.write_text("import os, huggingface_hub.constants as c; print(os.getppid(), c.HF_HUB_OFFLINE)")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    other = dict(env, HF_HUB_OFFLINE="0")

    def parent(env):
        pid, offline = forkrun.run([str(script)], cwd=tmp_path, env=env).stdout.split()
        return int(pid), offline

    assert parent(env) == (forkrun._servers[forkrun.server_key(env)]["process"].pid, "True")
    assert parent(other) == (forkrun._servers[forkrun.server_key(other)]["process"].pid, "False")
    monkeypatch.setattr(forkrun, "MAX_SERVERS", len(forkrun._servers))
    assert parent(dict(env, HF_HUB_OFFLINE="false")) == (os.getpid(), "False")  # this test process's own child


RANKS_PROBE = '''
import json, os, sys, time
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1])
dist.all_reduce(total)
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
        "ROLE_WORLD_SIZE", "MASTER_PORT", "OMP_NUM_THREADS")
line = json.dumps({"env": {k: os.environ.get(k) for k in keys}, "sum": int(total), "threads": torch.get_num_threads(),
                   "argv": sys.argv[1:]})
os.write(1, (line + "\\n").encode())  # one write: the ranks share the stream
if sys.argv[1] == "fail":
    if dist.get_rank() == 1:
        os._exit(5)
    import signal
    signal.signal(signal.SIGTERM, lambda *_: (os.write(2, b"rank 0 got SIGTERM\\n"), os._exit(143)))
    time.sleep(120)  # rank 0 waits: the launcher must stop it, with a SIGTERM first
dist.destroy_process_group()
'''


@pytest.mark.parametrize("how", ["end", "fail"])
def test_forked_ranks_run_as_torchrun_runs_them(tmp_path, how):
    """forkrun.torchrun gives each rank what torchrun's agent gives it (the variables, one stream of output, a process
    group), and stops the others when one fails, as torchrun does."""
    import time

    import forkrun
    from fixtures import free_port

    script = tmp_path / "ranks.py"
    script.write_text(RANKS_PROBE)
    env = dict(os.environ)
    real = subprocess.run([*forkrun.torchrun_command(free_port()), str(script), how], cwd=tmp_path,
                          env=dict(env, TORCHELASTIC_SHUTDOWN_TIMEOUT="5"), capture_output=True, text=True, timeout=300)
    started = time.time()
    forked = forkrun.torchrun([str(script), how], cwd=tmp_path, env=env)
    took = time.time() - started
    assert forkrun.server_key(env) in forkrun._servers

    def ranks(proc):
        seen = sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["env"]["RANK"])
        for r in seen:
            r["env"].pop("MASTER_PORT")
        return seen

    assert ranks(forked) == ranks(real) and len(ranks(real)) == 2
    assert ranks(real)[0]["sum"] == 3 and ranks(real)[0]["env"]["WORLD_SIZE"] == "2"
    if how == "end":
        assert real.returncode == forked.returncode == 0
    else:
        assert real.returncode != 0 and forked.returncode == 5
        assert took < 60  # rank 0 was stopped, not waited for
        assert "rank 0 got SIGTERM" in real.stderr and "rank 0 got SIGTERM" in forked.stderr
