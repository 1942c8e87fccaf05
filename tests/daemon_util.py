"""Run the real daemon (``run_daemon.py``) as a child process for the integration tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProc:
    def __init__(self, home: Path, *args: str, port: int | None = None):
        self.home, self.args = home, list(args)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = home / f"daemon-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.home / "daemon.token").read_text().strip()

    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> "DaemonProc":
        env = os.environ | {"EVOLUTION_HOME": str(self.home)}
        self.proc = subprocess.Popen([sys.executable, str(REPO / "run_daemon.py"), "--port", str(self.port), *self.args],
                                     cwd=REPO, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.3):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}) while waiting for {what}:\n"
                                     + self.output()[-3000:])
            try:
                value = predicate()
            except (httpx.HTTPError, OSError, ValueError, KeyError):
                value = None
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.output()[-3000:]}")

    def status(self) -> dict:
        return httpx.get(self.url + "/status", timeout=10).json()

    def served(self) -> int | None:
        r = httpx.get(self.url + "/health", timeout=10)
        return r.json()["served_generation"] if r.status_code == 200 else None

    def wait_serving(self, gen: int, timeout: float = 300) -> None:
        self.wait(lambda: self.served() == gen, timeout, f"generation {gen} to be served")

    def progress(self) -> dict:
        return json.loads((self.home / "logs" / "ageup.json").read_text())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the daemon did not stop within {timeout} s after signal {sig}:\n"
                                 + self.output()[-3000:])
