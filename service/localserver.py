"""One helper to run ``uniguard serve`` on a free localhost port, wait until /readyz answers 200, and stop it
(SIGTERM, then SIGKILL). Used by the benchmark, the load tests and the process tests.

It imports neither the app nor any serving dependency beyond the standard library, so a benchmark or a load script
can import it without loading the service into its own process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_command(model_dir: Path | str, port: int, host: str = HOST) -> list[str]:
    """The command line of ``uniguard serve`` on ``host:port``, run with this interpreter."""
    return [sys.executable, "-m", "uniguard", "serve", "--host", host, "--port", str(port), "--model", str(model_dir)]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of a GET; connection errors raise OSError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")


def server_env(settings: dict[str, str] | None = None, inherit_settings: bool = True) -> dict[str, str]:
    """The environment for a server: this one (without its UNIGUARD_* variables unless ``inherit_settings``), no
    hub access, and ``settings`` (UNIGUARD_* variables) on top."""
    env = {k: v for k, v in os.environ.items() if inherit_settings or not k.startswith("UNIGUARD_")}
    return {**env, "HF_HUB_OFFLINE": "1", **(settings or {})}


class LocalServer:
    """``uniguard serve`` on a free localhost port; its stdout and stderr (the JSON log) go to ``log_path`` (a
    temporary file if not given). Use as a context manager, or call ``start`` and ``stop``."""

    def __init__(
        self,
        model: Path | str,
        *,
        settings: dict[str, str] | None = None,
        log_path: Path | None = None,
        port: int | None = None,
        inherit_settings: bool = True,
        cwd: Path | None = None,
    ) -> None:
        self.model = model
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.env = server_env(settings, inherit_settings)
        self.cwd = cwd
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="uniguard-serve-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not running"
        return self.proc.pid

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, ready_timeout_s: float = 120.0) -> LocalServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            serve_command(self.model, self.port), env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd
        )
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"uniguard serve exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                status, body = http_get(f"{self.url}/readyz", timeout=1.0)
                if status == 200:
                    return
                last = body[:300]
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"uniguard serve not ready within {timeout_s:.0f}s ({last}); log: {self.log_path}")

    def metrics(self) -> dict[str, float]:
        """Prometheus samples (``name{labels}`` -> value) from /metrics."""
        _, text = http_get(f"{self.url}/metrics")
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    continue
        return out

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the server drains), then SIGKILL if it has not exited in time; the exit status."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    code = self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    code = self.proc.wait(timeout=10)
            else:
                code = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
