"""Server (and trainer) processes without the interpreter's start-up, for the tests that signal
a real process.

A fresh `python -m server.cli serve` spends about 5-8 s of CPU importing torch, transformers
and bitsandbytes before it reads its arguments, and the suite starts a dozen of them to SIGTERM,
SIGHUP or kill -9. A zygote (as Android's, or multiprocessing's forkserver) imports those once
per test process and forks a child per process asked for; the child runs `python -m MODULE
ARGV` (server.cli unless told) from there, in the test's environment and working directory, its
output appended to a log. It is a real separate process: its own pid, signals and exit status.
Run as a script, this file is the zygote; `Zygote` is the test side.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = "server.cli"


class ForkedProcess:
    """What a test holds of a zygote's child: subprocess.Popen's pid, poll, wait, send_signal,
    kill and returncode (negative: the signal that ended it)."""

    def __init__(self, pid: int, status: Path, module: str) -> None:
        self.pid = pid
        self._status = status
        self._module = module
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self._status.exists():
            self.returncode = int(self._status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self._module, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # once reaped, the pid may belong to someone else
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The test side: starts the zygote on first use, asks it for children, stops it at exit."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        atexit.register(self.stop)

    def spawn(self, argv: list[str], log: Path, module: str = SERVER,
              env: dict[str, str] | None = None, err: Path | None = None) -> ForkedProcess:
        """A child running `python -m MODULE ARGV` in `env` (this process's by default),
        output appended to `log` (its stderr to `err` when given)."""
        for path in (log, err or log):
            path.touch()  # there at once, as Popen's redirection would make it
        status = log.with_name(f"{log.name}.exit-{time.monotonic_ns()}")
        request = {"module": module, "argv": argv, "log": str(log), "err": str(err or log),
                   "status": str(status), "cwd": str(ROOT),
                   "env": dict(os.environ) if env is None else env}
        with self._lock:
            process = self._started()
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
            reply = process.stdout.readline()
        if not reply:
            raise RuntimeError(f"the server zygote exited with {process.wait()}")
        return ForkedProcess(json.loads(reply)["pid"], status, module)

    def _started(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen([sys.executable, __file__], cwd=ROOT, text=True,
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self._process

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.stdin.close()  # the zygote's loop ends at end of input
            self._process.wait(timeout=30)


# -- the zygote ------------------------------------------------------------------------------


def _serve() -> None:
    # Before numpy loads: OpenBLAS would start a worker thread, and a fork copies one thread.
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import bitsandbytes  # noqa: F401  (the heavy imports a child would otherwise repeat)
    import torch  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import common.modeling  # noqa: F401
    import server.app  # noqa: F401  (not server.cli: runpy runs that one fresh, as __main__)

    statuses: dict[int, str] = {}

    def reap(*_: object) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            path = statuses.pop(pid, None)
            if path is not None:
                partial = f"{path}.partial"
                Path(partial).write_text(str(os.waitstatus_to_exitcode(status)))
                os.replace(partial, path)  # whole, or not there

    signal.signal(signal.SIGCHLD, reap)
    for line in sys.stdin:
        request = json.loads(line)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # record the pid first
        pid = os.fork()
        if pid == 0:
            _child(request)
        statuses[pid] = request["status"]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        print(json.dumps({"pid": pid}), flush=True)


def _child(request: dict) -> None:
    """Become `python -m MODULE ARGV`; never returns."""
    import runpy

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    _point(0, os.devnull, os.O_RDONLY)
    for fd, name in ((1, "log"), (2, "err")):
        _point(fd, request[name], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    module = request["module"]
    sys.argv = [module, *request["argv"]]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _point(fd: int, path: str, flags: int) -> None:
    """Make `fd` refer to `path`, opened with `flags`, keeping no other descriptor of it."""
    opened = os.open(path, flags, 0o644)
    os.dup2(opened, fd)
    os.close(opened)


if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # the project's packages, as `python -m` from the root has them
    _serve()
