"""A running ``custody serve`` (a real uvicorn in a subprocess on a free loopback port) and a
client that signs its requests as the README says."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

from custody.service import auth

SECRET = b"exchange-backend-shared-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """``custody serve`` in a subprocess; stopped with SIGTERM."""

    def __init__(
        self, env: Mapping[str, str], tmp: Path, identity: str, key: Path, *extra: str, console: bool = False
    ) -> None:
        self.secret_file = tmp / "api.secret"
        self.secret_file.write_bytes(SECRET + b"\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Browsers allow WebAuthn on http only for localhost: the console's origin.
        self.origin = f"http://localhost:{self.port}"
        if console:
            extra = (*extra, "--console-origin", self.origin)
        self.log = tmp / f"serve-{self.port}.log"
        args = [sys.executable, "-m", "custody_cli", "serve", "--as", identity, "--key", str(key)]
        args += ["--secret-file", str(self.secret_file), "--port", str(self.port), *extra]
        full_env = {**os.environ, **env}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(args, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"custody serve exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                if requests.get(self.url + "/openapi.json", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"custody serve did not answer: {self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Client:
    """Signs every request with the shared secret (a fresh nonce each time)."""

    def __init__(self, url: str, secret: bytes = SECRET) -> None:
        self.url = url
        self.secret = secret
        self.session = requests.Session()

    def prepare(self, method: str, path: str, **kwargs: Any) -> requests.PreparedRequest:
        return self.session.prepare_request(requests.Request(method, self.url + path, **kwargs))

    def sign(
        self, req: requests.PreparedRequest, *, timestamp: int | None = None, nonce: str | None = None
    ) -> requests.PreparedRequest:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        nonce = nonce or secrets.token_hex(16)
        body = req.body or b""
        if isinstance(body, str):
            body = body.encode()
        assert req.method is not None
        req.headers[auth.TIMESTAMP] = ts
        req.headers[auth.NONCE] = nonce
        req.headers[auth.SIGNATURE] = auth.sign(self.secret, req.method, req.path_url, ts, nonce, body)
        return req

    def send(self, req: requests.PreparedRequest) -> requests.Response:
        return self.session.send(req, timeout=60)

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.send(self.sign(self.prepare(method, path, **kwargs)))

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.call(method, path, **kwargs)
        assert r.status_code in (200, 201), (r.status_code, r.text)
        return r.json()


def halted_metric(server: Server) -> float:
    """``custody_halted`` of the server's /metrics, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(server.url + "/metrics", timeout=30).text
    (value,) = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "custody_halted"]
    return float(value)
