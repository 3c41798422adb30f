"""Vault put and get over gRPC loopback, against the same bytes through an unencrypted gRPC stream.

Anchor: a bare gRPC server (another process, same chunking, same message sizes) that
receives a client stream and writes it to a file, and streams a file back. Measured:
`tensafe up` storing and reading an artifact (authentication, encryption, SHA-256,
fsync + rename, metadata commit; decryption and verification on the way back).

    python bench/bench_vault_e2e.py [--mib 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import grpc

CHUNK = 1 << 20

ANCHOR_SERVER = textwrap.dedent("""
    import os, sys, time
    from concurrent import futures
    import grpc
    path = sys.argv[2]
    def put(request_iterator, context):
        with open(path, "wb") as fh:
            for chunk in request_iterator:
                fh.write(chunk)
            fh.flush(); os.fsync(fh.fileno())
        return b"ok"
    def get(request, context):
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk
    ident = lambda b: b
    handler = grpc.method_handlers_generic_handler("bench.Raw", {
        "Put": grpc.stream_unary_rpc_method_handler(put, ident, ident),
        "Get": grpc.unary_stream_rpc_method_handler(get, ident, ident)})
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(8), options=opts)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chunks(total: int, block: bytes):
    for _ in range(total // len(block)):
        yield block


def anchor_round(target: str, total: int, block: bytes) -> tuple[float, float]:
    with grpc.insecure_channel(target, [("grpc.max_receive_message_length", 64 << 20)]) as ch:
        put = ch.stream_unary("/bench.Raw/Put")
        get = ch.unary_stream("/bench.Raw/Get")
        t = time.perf_counter()
        put(chunks(total, block))
        t_put = time.perf_counter() - t
        t = time.perf_counter()
        got = sum(len(c) for c in get(b""))
        t_get = time.perf_counter() - t
    assert got == total
    return t_put, t_get


def vault_round(client, total: int, block: bytes) -> tuple[float, float]:
    t = time.perf_counter()
    info = client.artifacts.put(chunks(total, block), name="bench")
    t_put = time.perf_counter() - t
    t = time.perf_counter()
    got = sum(len(c) for c in client.artifacts.iter_plaintext(info.artifact_id))
    t_get = time.perf_counter() - t
    assert got == total
    client.delete_artifact(info.artifact_id)
    return t_put, t_get


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    total, block = args.mib << 20, os.urandom(CHUNK)
    with tempfile.TemporaryDirectory() as tmp:
        anchor_port, vault_port = free_port(), free_port()
        anchor = subprocess.Popen([sys.executable, "-c", ANCHOR_SERVER, str(anchor_port), str(Path(tmp) / "raw")],
                                  stdout=subprocess.PIPE, text=True)
        assert anchor.stdout is not None
        anchor.stdout.readline()
        env = dict(os.environ, TENSAFE_METRICS_PORT="0", TENSAFE_LOG_LEVEL="WARNING", TENSAFE_OPENAI_PORT="0",
                   TENSAFE_TINKER_PORT="0")
        vault = subprocess.Popen([sys.executable, "-m", "tensafe.cli", "up", "--data-dir", str(Path(tmp) / "d"),
                                  "--port", str(vault_port)], env=env, stdout=subprocess.PIPE, text=True)
        assert vault.stdout is not None
        api_key = next(line.strip() for line in vault.stdout if line.startswith("ts-"))
        try:
            from tg_tinker import ServiceClient

            client = ServiceClient(api_key=api_key, base_url=f"127.0.0.1:{vault_port}", retry_count=0)
            client.artifacts.put(b"warm-up", name="warm")
            a_put, a_get, v_put, v_get = [], [], [], []
            for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits both alike
                p, g = anchor_round(f"127.0.0.1:{anchor_port}", total, block)
                a_put.append(p)
                a_get.append(g)
                p, g = vault_round(client, total, block)
                v_put.append(p)
                v_get.append(g)
            client.close()
        finally:
            vault.send_signal(signal.SIGTERM)
            anchor.kill()
            vault.wait(60)
    gb = total / 1e9
    for name, anchor_t, vault_t in (("put", a_put, v_put), ("get", a_get, v_get)):
        a, v = statistics.median(anchor_t), statistics.median(vault_t)
        print(f"{name} {args.mib} MiB: plain gRPC stream {gb / a:6.2f} GB/s, vault {gb / v:6.2f} GB/s, "
              f"ratio {a / v:5.2f} (target >= 0.8)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
