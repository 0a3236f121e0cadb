"""The project's scripts (finetune.py, merge_lora.py, run_gptq.py, ...) run for tests without their ~9 s of imports
each time.

A server, one per test process, imports torch, transformers, peft, accelerate, datasets and deepspeed once, and forks
a child for each run. The child runs the script as `python script.py ARGS` would: its argv, working directory and
environment, its own stdout and stderr, its exit code, the atexit handlers. Nothing of chattune is imported by the
server, so what chattune does at import (its warning filters, CHATTUNE_* variables) happens in each child.

`torchrun` does the same for a multi-process run: N forked ranks with the variables torchrun gives its workers (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...), their output in one stream, and torchrun's rule when one fails: the
others get SIGTERM, then SIGKILL after a grace period. Tests of torchrun itself (a SIGTERM to the job, the wrappers
and job scripts) start the real torchrun.

A run whose environment differs in a variable the preloaded libraries read while importing (HF_*, TRANSFORMERS_*,
TORCH*, ...) gets a server started with that environment (libraries also set such variables in the test process as
they go, TORCHINDUCTOR_CACHE_DIR on first use: the next run then needs a new server, once); past `MAX_SERVERS`, a
real process. Tests of the process itself (signals, a kill, output printed while importing) start real processes
themselves.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "transformers", "transformers.trainer", "peft", "accelerate", "datasets", "deepspeed",
           "safetensors.torch")
# read by the preloaded libraries when they are imported: a run with other values needs a process of its own
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "CUDA", "OMP_", "MKL", "DS_",
                   "DEEPSPEED", "ACCELERATE", "TOKENIZERS", "PYTHON", "LD_", "TRITON", "BNB", "BITSANDBYTES")

MAX_SERVERS = 3  # per test process (each holds ~600 MB)

_servers: dict[tuple, dict] = {}  # by the import-time part of the environment: path, process, env


def script(name: str, *args, rc: int | None = 0, env: dict | None = None, timeout: int = 600
           ) -> subprocess.CompletedProcess:
    """`python ROOT/name args` in ROOT, output captured as text; with `rc`, asserts the exit code."""
    proc = run([str(ROOT / name), *map(str, args)], env=env, timeout=timeout)
    if rc is not None:
        assert proc.returncode == rc, proc.stderr[-3000:]
    return proc


def run(argv: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    command = [sys.executable, *argv]
    server = _server_for(env)
    if server is None:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return _request(server, command, {"argv": argv, "cwd": str(cwd), "env": env}, timeout)


def torchrun_command(port: int, nproc: int = 2) -> list[str]:
    """The real torchrun's command line, for one node, before the script and its arguments."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]


def torchrun(argv: list[str], nproc: int = 2, cwd: Path = ROOT, env: dict | None = None,
             timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc --master_port PORT argv` on one node, its ranks forked, on a free port (a
    second try only if another process took it before rank 0 bound it). The exit code is the first failed rank's
    (torchrun's own is 1 then), or 0."""
    from fixtures import free_port

    env, argv = dict(os.environ if env is None else env), [str(a) for a in argv]
    for _ in range(2):
        port = free_port()
        command = [*torchrun_command(port, nproc), *argv]
        server = _server_for(env)
        if server is not None:
            proc = _request(server, command, {"argv": argv, "cwd": str(cwd), "env": env, "ranks": nproc,
                                              "port": port}, timeout)
        else:
            proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if "Address already in use" not in proc.stderr:
            break
    return proc


def _request(server: dict, command: list[str], request: dict, timeout: int) -> subprocess.CompletedProcess:
    path = server["path"]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            conn.sendall(json.dumps({**request, "out": out, "err": err}).encode() + b"\n")
            replies = conn.makefile("r")
            pids = json.loads(replies.readline())["pids"]
            conn.settimeout(timeout)
            try:
                code = json.loads(replies.readline())["code"]
            except TimeoutError:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(command, timeout) from None
        return subprocess.CompletedProcess(command, code, Path(out).read_text(errors="replace"),
                                           Path(err).read_text(errors="replace"))


def server_key(env: dict) -> tuple:
    """The part of an environment a fork cannot change: the variables read while the libraries are imported."""
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)))


def _server_for(env: dict) -> dict | None:
    """The running server for this environment, started if needed; None past MAX_SERVERS."""
    key = server_key(env)
    server = _servers.get(key)
    if server is not None and server["process"].poll() is None:
        return server
    if server is None and len(_servers) >= MAX_SERVERS:
        return None
    folder = tempfile.mkdtemp(prefix="forkrun-")
    path = os.path.join(folder, "socket")
    process = subprocess.Popen([sys.executable, __file__, "--serve", path], cwd=ROOT, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(path):
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the fork server did not start (exit {process.poll()})")
        time.sleep(0.05)
    server = _servers[key] = {"path": path, "process": process, "env": dict(env)}
    atexit.register(process.kill)
    return server


def serve(path: str) -> None:
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # the path appears once the server listens
    listener.listen()
    while True:
        conn, _ = listener.accept()
        request = json.loads(conn.makefile("r").readline())
        sys.stdout.flush()
        sys.stderr.flush()
        ranks = request.get("ranks")
        pids = []
        for rank in range(ranks or 1):
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                _child(request, _rank_env(rank, ranks, request["port"]) if ranks else {})
            pids.append(pid)
        conn.sendall(json.dumps({"pids": pids}).encode() + b"\n")
        code = _wait(pids)
        try:
            conn.sendall(json.dumps({"code": code}).encode() + b"\n")
        except OSError:  # the test gave up on it (timeout)
            pass
        conn.close()


def _rank_env(rank: int, world: int, port: int) -> dict:
    """What torchrun's agent sets for each worker of a one-node run (OMP_NUM_THREADS only where it is not set)."""
    same = {"WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world, "GROUP_RANK": 0, "GROUP_WORLD_SIZE": 1,
            "ROLE_NAME": "default", "ROLE_WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            "TORCHELASTIC_RESTART_COUNT": 0, "TORCHELASTIC_MAX_RESTARTS": 0, "TORCHELASTIC_RUN_ID": "none"}
    return {k: str(v) for k, v in {**same, "RANK": rank, "LOCAL_RANK": rank, "ROLE_RANK": rank}.items()}


def _wait(pids: list[int], grace: float = 5.0) -> int:
    """Wait for every child; once one fails, the others get SIGTERM and, after `grace` seconds, SIGKILL (torchrun's
    shutdown). The first failure's exit code, else 0."""
    code, waiting, deadline = 0, set(pids), None
    while waiting:
        pid, status = os.waitpid(-1, os.WNOHANG if deadline else 0)
        if pid == 0:
            if time.time() > deadline:
                for other in waiting:
                    os.kill(other, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.05)
            continue
        waiting.discard(pid)
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code != 0 and code == 0:
            code = exit_code
            for other in waiting:
                os.kill(other, signal.SIGTERM)
            deadline = time.time() + grace
    return code


def _child(request: dict, rank_env: dict) -> None:
    """`python argv[0] argv[1:]`, in this forked process; never returns."""
    import atexit as child_atexit
    import runpy
    import traceback

    # the ranks of one run write to one stream, as torchrun's workers inherit its stdout and stderr
    mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if rank_env else os.O_TRUNC)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(os.open(request["out"], mode), 1)
    os.dup2(os.open(request["err"], mode), 2)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(rank_env)
    if rank_env and "OMP_NUM_THREADS" not in request["env"]:  # torchrun's default for several workers per node
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    os.chdir(request["cwd"])
    script = os.path.abspath(request["argv"][0])
    sys.argv = [request["argv"][0], *request["argv"][1:]]
    sys.path[0] = os.path.dirname(script)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        child_atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2])
