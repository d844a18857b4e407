"""`moe-ext serve` as a real process on 127.0.0.1 (a free port chosen by the server), for the
HTTP tests and the load benchmark: started, waited for (GET /health), stopped."""
import os
import re
import subprocess
import sys
import threading
import time

import httpx


class Server:
    """Runs `python -m moe_ext.cli serve --host 127.0.0.1 --port 0 --quiet ARGS...`; `url` is
    its address once /health answers. The output is drained (and kept in `lines`) so the
    pipe never blocks the server."""

    def __init__(self, args, timeout: float = 120.0):
        cmd = [sys.executable, "-m", "moe_ext.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--quiet", *map(str, args)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.lines, self.url = [], None
        found = threading.Event()

        def drain():
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"on (http://127\.0\.0\.1:\d+)$", line.strip())
                if m and self.url is None:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        found.wait(timeout)
        if self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not answer /health:\n" + "".join(self.lines))

    def stop(self) -> bool:
        """SIGTERM, then wait. True when the server shut down cleanly: uvicorn finishes its
        requests, then re-raises the signal (exit status -15), and printed no traceback."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode in (0, -15) and not any("Traceback" in l for l in self.lines)
