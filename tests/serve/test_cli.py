"""`maskdistill serve RUN_DIR` as a user runs it: prints the URL, serves, stops on Ctrl-C."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.serve.conftest import free_port

pytestmark = pytest.mark.slow  # a Ray and Serve start-up in a subprocess


def test_serve_command_serves_until_interrupted(trained_run: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "maskdistill", "serve", str(trained_run), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith(f"serving {trained_run} at http://127.0.0.1:{port}"), line
            assert requests.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
