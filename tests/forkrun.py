"""The project's scripts (finetune.py, merge_lora.py, run_gptq.py, ...) run for tests without their ~9 s of imports
each time.

A server, one per test process, imports torch, transformers, peft, accelerate, datasets and deepspeed once, and forks
a child for each run. The child runs the script as `python script.py ARGS` would: its argv, working directory and
environment, its own stdout and stderr, its exit code, the atexit handlers. Nothing of chattune is imported by the
server, so what chattune does at import (its warning filters, CHATTUNE_* variables) happens in each child.

What a fork cannot give falls back to a real process: an environment that differs from the server's in a variable the
preloaded libraries read while importing (HF_*, TRANSFORMERS_*, TORCH*, ...). Tests of the process itself (signals,
a kill, output printed while importing) start real processes themselves.
"""

from __future__ import annotations

import atexit
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

_server: dict = {}


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
    if not _forkable(env):
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    path = _start()
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            conn.sendall(json.dumps({"argv": argv, "cwd": str(cwd), "env": env, "out": out, "err": err}).encode()
                         + b"\n")
            replies = conn.makefile("r")
            pid = json.loads(replies.readline())["pid"]
            conn.settimeout(timeout)
            try:
                code = json.loads(replies.readline())["code"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(command, timeout) from None
        return subprocess.CompletedProcess(command, code, Path(out).read_text(errors="replace"),
                                           Path(err).read_text(errors="replace"))


def _forkable(env: dict) -> bool:
    started = _server.get("env", os.environ)
    keys = {k for k in set(env) | set(started) if k.startswith(IMPORT_TIME_ENV)}
    return all(env.get(k) == started.get(k) for k in keys)


def _start() -> str:
    if "path" in _server and _server["process"].poll() is None:
        return _server["path"]
    folder = tempfile.mkdtemp(prefix="forkrun-")
    path = os.path.join(folder, "socket")
    process = subprocess.Popen([sys.executable, __file__, "--serve", path], cwd=ROOT, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(path):
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the fork server did not start (exit {process.poll()})")
        time.sleep(0.05)
    _server.update(path=path, process=process, env=dict(os.environ))
    atexit.register(process.kill)
    return path


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
        pid = os.fork()
        if pid == 0:
            listener.close()
            conn.close()
            _child(request)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        try:
            conn.sendall(json.dumps({"code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        except OSError:  # the test gave up on it (timeout)
            pass
        conn.close()


def _child(request: dict) -> None:
    """`python argv[0] argv[1:]`, in this forked process; never returns."""
    import atexit as child_atexit
    import runpy
    import traceback

    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
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
