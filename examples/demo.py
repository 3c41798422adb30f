"""`make demo`: start the embedded stack, run the main job against it, stop it.

Today the main job is the health check of all six services (examples/quickstart/
01_hello_tensafe.py); the training issues turn it into a real fine-tuning run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=".tensafe")
    parser.add_argument("--port", type=int, default=50051)
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    env = dict(os.environ, TENSAFE_METRICS_PORT=os.environ.get("TENSAFE_METRICS_PORT", "0"))
    print(f"Starting `tensafe up` on 127.0.0.1:{args.port} with data dir {data_dir} ...", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "tensafe.cli", "up", "--data-dir", str(data_dir),
                               "--port", str(args.port)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        api_key = None
        assert server.stdout is not None
        for line in server.stdout:  # the banner ends with the API key
            print(f"  | {line.rstrip()}")
            if line.startswith("ts-"):
                api_key = line.strip()
                break
        if api_key is None:
            print("the stack did not start; see the messages above", file=sys.stderr)
            return 1
        job_env = dict(os.environ, TS_API_KEY=api_key, TS_BASE_URL=f"127.0.0.1:{args.port}")
        deadline = time.monotonic() + 30
        while True:
            job = subprocess.run([sys.executable, str(HERE / "quickstart" / "01_hello_tensafe.py")], env=job_env)
            if job.returncode == 0 or time.monotonic() > deadline:
                return job.returncode
            time.sleep(0.5)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        print("Stack stopped.")


if __name__ == "__main__":
    raise SystemExit(main())
