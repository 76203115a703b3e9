"""A ``uniguard serve`` subprocess on localhost: start on a free port, wait for /readyz, stop (SIGTERM, then kill).

Imports neither the app nor torch, so benchmarks and tests can use it anywhere.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def serve_command(model_dir: Path | str, port: int) -> list[str]:
    """The command line of a ``uniguard serve`` on localhost, run with this interpreter."""
    return [sys.executable, "-m", "uniguard", "serve", "--host", HOST, "--port", str(port), "--model", str(model_dir)]


def start_server(model_dir: Path, port: int, env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "UNIGUARD_LOG_LEVEL": "warning", **(env_extra or {})}
    return subprocess.Popen(serve_command(model_dir, port), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float = 120.0) -> None:
    """Poll ``url``/readyz until 200; fail at once (with its stderr) if the process exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"the service exited with code {proc.returncode}: {err[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the service at {url} was not ready within {timeout_s:.0f}s")


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
