"""A server as a background process, for notebooks, tests and benchmarks::

    with ServerProcess("--engine", "naive") as server:      # python -m labkit.serve on a free 127.0.0.1 port
        run_load(server.url, ...)
    # leaving the block sends SIGTERM: the server drains and exits

    with ThreadedServer(create_app(backend, tokenizer, name)) as server:   # the same, in this process

It waits for ``GET /health`` before returning, and if the server dies while starting, the error says why
(the tail of its log). Children inherit this process's labkit (PYTHONPATH), so a notebook and the server
it starts run the same code.
"""
from __future__ import annotations

import atexit
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, model: str | os.PathLike | None = None, port: int | None = None,
                 threads: int | None = 1, startup_timeout: float = 180.0, env: dict | None = None):
        from labkit.checkpoint import DEFAULT_MODEL_DIR

        self.model = str(model or DEFAULT_MODEL_DIR)
        self.port = port or free_port()
        self.args = ["--model", self.model, "--port", str(self.port), "--parent-pid", str(os.getpid()), *args]
        if threads:
            self.args += ["--threads", str(threads)]
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH")) if p)
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="labkit-serve-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 30) -> str:
        self.log.flush()
        return "\n".join(pathlib.Path(self.log.name).read_text().splitlines()[-n:])

    def launch(self) -> "ServerProcess":
        """Start the process and return at once (several servers then load their models side by side)."""
        atexit.register(self.stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "labkit.serve", *self.args], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=REPO_ROOT)
        return self

    def wait_ready(self) -> "ServerProcess":
        """Until ``GET /health`` answers 200; an error with the log's tail if the server exits or times out."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server did not answer /health within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def start(self) -> "ServerProcess":
        return self.launch().wait_ready()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the drain; SIGKILL (and an error) if it does not exit within ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the server did not exit {timeout:.0f} s after SIGTERM; killed it:\n{self.log_tail()}")

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ThreadedServer:
    """uvicorn serving an ``app`` (``labkit.server.create_app``) on 127.0.0.1 from a thread of this process:
    what tests use, where a subprocess would cost a model load each. Signals stay with the main thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start (see the log above)")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
