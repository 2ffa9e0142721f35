"""`w2wreg serve` on a free loopback port, in a thread of the test process (tests/test_serve*.py)."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def hub_client_online() -> Iterator[None]:
    """huggingface_hub allowed to talk to the local test hub (conftest makes it offline: no test may reach a real
    hub), with no token of the machine's own."""
    import huggingface_hub.constants as c

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(c, "HF_HUB_OFFLINE", False)
        mp.setenv("HF_HUB_OFFLINE", "0")
        mp.delenv("HF_TOKEN", raising=False)
        mp.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        yield


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> until stop()."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def request(self, method: str, path: str, body=None, token: str | None = None, headers: dict | None = None):
        """(status, headers, parsed JSON or raw bytes) of one request, without any client library."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = data
        return resp.status, dict(resp.getheaders()), parsed

    def get(self, path: str, **params):
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        return self.request("GET", path + ("?" + query if query else ""))


CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@contextmanager
def chromium(prefs: dict | None = None, size: str = "1300,900"):
    """A headless Debian chromium driven by selenium through the given chromedriver (nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={size}"):
        opts.add_argument(arg)
    if prefs:
        opts.add_experimental_option("prefs", prefs)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


class ServeProcess:
    """`w2wreg serve` in a process of its own (its memory measurable: /proc/PID/status) until stop()."""

    def __init__(self, registry, token: str, *args: str, port: int | None = None):
        import os
        import socket
        import subprocess
        import sys
        from pathlib import Path

        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port  # a port given: a server started again where one was
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "w2wreg"
        cmd = [str(exe), "--registry", str(registry), "serve", "--port", str(self.port), "--token", token, *args]
        self.log = Path(registry).parent / f"serve-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stderr=log, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        # ready = listening (it loads no preview base until a preview asks for one)
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"w2wreg serve did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def _status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))

    def rss(self) -> int:
        return self._status("VmRSS")

    def peak_rss(self) -> int:
        """The most memory the process held since it started or since reset_peak()."""
        return self._status("VmHWM")

    def reset_peak(self) -> None:
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")  # Linux: the peak starts again from the memory held now

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def kill(self) -> None:
        """Stop it as a crash or a power cut would: at once, whatever it was doing."""
        self.proc.kill()
        self.proc.wait(timeout=30)
