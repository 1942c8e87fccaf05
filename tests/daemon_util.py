"""Run the real daemon (``run_daemon.py``) as a child process for the integration tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai

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

    def start(self) -> DaemonProc:
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


class Chatter:
    """Chat clients that keep asking (plain and streaming, through the official openai client).

    Every failure is noted, never raised. ``pause`` between a reply and the next question:
    clients that never pause keep both cores busy at normal priority, and the niced age-up then
    (by design) hardly runs.
    """

    def __init__(self, url: str, clients: int = 2, pause: float = 0.2, max_tokens: int = 8):
        self.pause, self.max_tokens = pause, max_tokens
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, timeout=60)
        self.stop, self.failures, self.models = threading.Event(), [], []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        msgs = [{"role": "user", "content": "What is your name?"}]
        while not self.stop.is_set():
            try:
                if i % 2:
                    chunks = list(self.client.chat.completions.create(model="evolution", messages=msgs,
                                                                      max_tokens=self.max_tokens, stream=True))
                    assert chunks and chunks[0].model.startswith("evolution-gen-")
                    assert len({c.model for c in chunks}) == 1  # one model per reply, even mid-swap
                    self.models.append(chunks[0].model)
                else:
                    r = self.client.chat.completions.create(model="evolution", messages=msgs,
                                                            max_tokens=self.max_tokens)
                    assert r.choices[0].message.content
                    self.models.append(r.model)
            except Exception as exc:  # noqa: BLE001 — every failure is the finding
                self.failures.append(repr(exc))
            self.stop.wait(self.pause)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


@contextmanager
def serving(daemon):
    """The daemon's HTTP app on uvicorn in a thread, on a free loopback port; yields its URL."""
    from evolution.server import create_app

    with serving_app(create_app(daemon)) as url:
        yield url


@contextmanager
def serving_app(app):
    """An ASGI app on uvicorn in a thread, on a free loopback port; yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        t.join(10)


def tick_until(daemon, cond, what: str, timeout: float = 600) -> None:
    """Run an in-process daemon's scheduler tick until ``cond()`` holds."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        daemon.tick()
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {daemon.status()}")
