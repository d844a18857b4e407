"""ServerProcess: `moe-ext serve` in a child process, started and waited for until GET
/health answers, then stopped; for tests, benchmarks and scripts that need a real server.

    with ServerProcess(["--model", "deploy/pmol"]) as server:      # 127.0.0.1, a free port
        urllib.request.urlopen(server.url + "/health")
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


class ServerProcess:
    """Runs `python -m moe_ext.cli serve --host HOST --port 0 --quiet ARGS...` (the server
    picks a free port and prints it); `url` is its address once /health answers. The
    output is drained into `lines`, so the pipe never blocks the server. RuntimeError with
    that output when it does not come up within `timeout` seconds."""

    def __init__(self, args, host: str = "127.0.0.1", timeout: float = 120.0):
        cmd = [sys.executable, "-m", "moe_ext.cli", "serve", "--host", host, "--port", "0",
               "--quiet", *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.url = None
        found = threading.Event()

        def drain():
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r" on (http://\S+:\d+)$", line.strip())
                if m and self.url is None:
                    self.url = m.group(1)
                    found.set()
            found.set()  # the process ended

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        found.wait(timeout)
        while self.url is not None and time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("moe-ext serve did not come up:\n" + "".join(self.lines[-40:]))

    def stop(self) -> bool:
        """SIGTERM, then wait. True when it shut down cleanly: uvicorn finishes the open
        requests, then re-raises the signal (exit status -15), and printed no traceback."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode in (0, -15) and not any("Traceback" in l for l in self.lines)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
