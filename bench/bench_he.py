"""HE-LoRA through `tensafe up`: the LoRA delta of one layer (r = 16) on CKKS ciphertexts, over gRPC.

Anchor: TenSEAL's own encrypted vector-matrix product ``enc_x.mm(A)`` (d x r, rotations with Galois
keys) on the same shapes, in the same process and run. Measured:

* single token (replicated packing, two rounds): encrypt + he service + decrypt per token per layer,
  for d = 576 (SmolLM2), 768 and 4096; the ratio anchor / ours;
* column packing with every slot used (4,096 tokens at N = 8192): amortised time per token per layer;
* sizes: the registered public context, each request and response.

The adapter is a PEFT adapter of the given shapes with random weights (timing does not depend on the
values), stored in the vault as a trainer checkpoint; every result is checked against the plaintext
delta (relative error printed).

    python bench/bench_he.py [--dims 576,768,4096] [--column-dims 576] [--repeat 10] [--anchor-dims 576,768]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import tenseal as ts
import torch
from safetensors.torch import save as st_save

RANK, ALPHA = 16, 32
MODULE = "model.layers.0.self_attn.q_proj"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint(d: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A trainer-format checkpoint holding a standard PEFT LoRA adapter for one d x d module."""
    A = rng.uniform(-1, 1, (RANK, d)) / np.sqrt(d)
    B = rng.normal(0, 1e-2, (d, RANK))
    weights = {f"base_model.model.{MODULE}.lora_A.weight": torch.tensor(A, dtype=torch.float32),
               f"base_model.model.{MODULE}.lora_B.weight": torch.tensor(B, dtype=torch.float32)}
    files = {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA,
                                                "target_modules": ["q_proj"]}).encode(),
             "adapter_model.safetensors": st_save(weights), "session.json": b"{}",
             "rng.safetensors": st_save({"cpu": torch.zeros(1, dtype=torch.uint8)})}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), A.astype(np.float32).astype(np.float64), B.astype(np.float32).astype(np.float64)


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def anchor_mm(d: int, rng: np.random.Generator) -> float:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2 ** 40
    ctx.generate_galois_keys()
    enc_x = ts.ckks_vector(ctx, rng.normal(0, 1, d).tolist())
    matrix = (rng.normal(0, 0.05, (d, RANK))).tolist()
    t0 = time.perf_counter()
    enc_x.mm(matrix)
    return time.perf_counter() - t0


def single_token(inference, d: int, A: np.ndarray, B: np.ndarray, repeat: int, pause: float,
                 anchor: float | None, rng: np.random.Generator) -> None:
    """``repeat`` tokens (after two warm-up ones), ``pause`` seconds apart: the time the plaintext plane
    spends on the base model between two tokens, in which the he service's workers prepare the next
    token's encrypted masks. With no pause they compete with the client and the service for the cores."""
    times, server_ms, err, made, ready = [], [], 0.0, 0, 0
    for i in range(repeat + 2):
        time.sleep(pause)
        x = rng.normal(0, 1, d)
        t0 = time.perf_counter()
        enc = inference.encrypt_input(x)
        out = inference.process(enc)
        delta = inference.decrypt_output(out)[MODULE]
        if i >= 2:
            times.append(time.perf_counter() - t0)
            server_ms.append(out.stats.server_ms["total_ms"])
            made += out.stats.counts["encryptions"]
            ready += out.stats.counts["prepared_encryptions"]
        err = max(err, rel(delta, ALPHA / RANK * B @ (A @ x)))
    med = statistics.median(times)
    c = out.stats.counts
    how = f"{pause * 1e3:.0f} ms apart" if pause else "back to back"
    line = (f"single  d={d:5d}, {how:>13}: {med * 1e3:6.1f} ms per token per layer (median of {len(times)}; service "
            f"{statistics.median(server_ms):5.1f} ms; masks ready {ready}/{ready + made}), 2 RPCs, request "
            f"{out.stats.request_bytes / 1e6:.2f} MB, response {out.stats.response_bytes / 1e6:.2f} MB, "
            f"ct x pt {c['plaintext_multiplies']}, rotations {c['rotations']}, rel err {err:.1e}")
    if anchor:
        line += f"; anchor / ours = {anchor / med:.0f}x"
    print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="576,768,4096")
    parser.add_argument("--column-dims", default="576")
    parser.add_argument("--anchor-dims", default="576,768")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--pause-ms", type=float, default=100.0,
                        help="time between single tokens in the paced run (the plaintext plane's forward)")
    args = parser.parse_args()
    dims = [int(v) for v in args.dims.split(",") if v]
    column_dims = [int(v) for v in args.column_dims.split(",") if v]
    anchor_dims = [int(v) for v in args.anchor_dims.split(",") if v]
    rng = np.random.default_rng(0)

    anchors = {}
    for d in anchor_dims:
        anchors[d] = anchor_mm(d, rng)
        print(f"anchor  TenSEAL enc_x.mm({d} x {RANK}) with Galois keys: {anchors[d] * 1e3:9.1f} ms", flush=True)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSAFE_", "TS_"))}
    env.update({"TENSAFE_METRICS_PORT": "0", "TENSAFE_LOG_LEVEL": "WARNING", "TENSAFE_ACCESS_LOG": "false",
                "TENSAFE_OPENAI_PORT": "0", "TENSAFE_TINKER_PORT": "0"})
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([sys.executable, "-m", "tensafe.cli", "up", "--data-dir", str(Path(tmp) / "d"),
                                   "--port", str(port)], env=env, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        api_key = next(line.strip() for line in server.stdout if line.startswith("ts-"))
        try:
            from tg_tinker import ServiceClient
            from tg_tinker.he import HEKeyManager, create_private_inference_mode

            client = ServiceClient(api_key=api_key, base_url=f"127.0.0.1:{port}", retry_count=3, timeout=600)
            deadline = time.monotonic() + 120
            while set(client.check_health().values()) != {"SERVING"} and time.monotonic() < deadline:
                time.sleep(0.5)
            bundle = HEKeyManager("default").generate_key_bundle()
            print(f"public context (N = 8192, primes 60/40/40/60, public key only): "
                  f"{len(bundle.public_context()) / 1e6:.2f} MB (target <= 2 MB)", flush=True)
            for d in sorted(set(dims) | set(column_dims)):
                data, A, B = checkpoint(d, rng)
                artifact = client.artifacts.put(data, kind="checkpoint", name=f"bench-{d}",
                                                content_type="application/x-tar")
                inference = create_private_inference_mode(bundle, client=client, adapter=artifact.artifact_id)
                scaling = ALPHA / RANK
                time.sleep(args.pause_ms / 1e3)  # the workers start on the adapter's masks when it loads
                if d in dims:
                    for pause in (args.pause_ms / 1e3, 0.0):
                        single_token(inference, d, A, B, args.repeat, pause, anchors.get(d), rng)
                if d in column_dims:
                    x = rng.normal(0, 1, (args.tokens, d))
                    t0 = time.perf_counter()
                    enc = inference.encrypt_input(x)
                    t1 = time.perf_counter()
                    out = inference.process(enc)
                    t2 = time.perf_counter()
                    delta = inference.decrypt_output(out)[MODULE]
                    t3 = time.perf_counter()
                    err = rel(delta, scaling * x @ A.T @ B.T)
                    c, s = out.stats.counts, out.stats
                    total = t3 - t0
                    print(f"column  d={d:5d}, {args.tokens} tokens: {total / args.tokens * 1e3:.2f} ms per token per "
                          f"layer (target <= 3 ms at d=576): encrypt_input {t1 - t0:.1f} s, process {t2 - t1:.1f} s "
                          f"(encrypting in the background while chunks upload; {s.rpcs} RPCs; service compute "
                          f"{s.server_ms['compute_ms'] / 1e3:.1f} s, "
                          f"(de)serialise {(s.server_ms['deserialize_ms'] + s.server_ms['serialize_ms']) / 1e3:.1f} s),"
                          f" decrypt {t3 - t2:.1f} s; requests {s.request_bytes / 1e6:.0f} MB, responses "
                          f"{s.response_bytes / 1e6:.0f} MB; scalar mults {c['plaintext_multiplies']}, depth "
                          f"{c['multiplicative_depth']}, rotations {c['rotations']}, rel err {err:.1e}", flush=True)
                    if d in anchors:
                        print(f"        anchor / ours (per token) = {anchors[d] / (total / args.tokens):.0f}x",
                              flush=True)
                client.he.unload_adapter(inference.adapter.adapter_id)
            client.close()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
