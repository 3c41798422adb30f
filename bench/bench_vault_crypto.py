"""In-memory throughput of the artifact container against its two primitives, in the same run.

Over the same N bytes (16 distinct 1 MiB buffers of os.urandom, cycled):
  (a) cryptography's AESGCM alone, one encrypt_into call per 1 MiB buffer into a reused output buffer;
  (b) hashlib.sha256 alone;
  (c) ContainerWriter: encrypt + SHA-256 of the plaintext (1 MiB segments);
  (d) ContainerReader: decrypt + verify + SHA-256, fed the container in 1 MiB chunks as the vault reads them
      from disk (chunks do not line up with the 1 MiB + 16 byte segments).
Target (issue 4): c / min(a, b) >= 0.8 and d / min(a, b) >= 0.8. Each is run --repeats times, interleaved;
medians are reported.

    python bench/bench_vault_crypto.py [--mib 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sdk"))

from tg_tinker.container import ContainerReader, ContainerWriter

MIB = 1 << 20
TARGET = 0.8


def aes_alone(buffers: list[bytes], count: int) -> float:
    aead = AESGCM(os.urandom(32))
    out = bytearray(MIB + 16)
    nonce, aad = os.urandom(12), os.urandom(64)
    start = time.perf_counter()
    for i in range(count):
        aead.encrypt_into(nonce, buffers[i % len(buffers)], aad, out)
    return time.perf_counter() - start


def sha_alone(buffers: list[bytes], count: int) -> float:
    digest = hashlib.sha256()
    start = time.perf_counter()
    for i in range(count):
        digest.update(buffers[i % len(buffers)])
    digest.digest()
    return time.perf_counter() - start


def container_encrypt(buffers: list[bytes], count: int, key: bytes) -> tuple[float, bytes | None, int]:
    # Segments are dropped as they come, as the vault drops them once written, so freed memory is reused.
    start = time.perf_counter()
    writer = ContainerWriter(key, "tnt_bench", "art_bench")
    stored = len(writer.header)
    for i in range(count):
        for segment in writer.update(buffers[i % len(buffers)]):
            stored += len(segment)
    stored += len(writer.finalize())
    elapsed = time.perf_counter() - start
    return elapsed, writer.plaintext_sha256, stored


def container_bytes(buffers: list[bytes], count: int, key: bytes) -> bytes:
    writer = ContainerWriter(key, "tnt_bench", "art_bench")
    segments = [writer.header]
    for i in range(count):
        segments.extend(writer.update(buffers[i % len(buffers)]))
    segments.append(writer.finalize())
    return b"".join(segments)


def container_decrypt(blob: bytes, key: bytes) -> tuple[float, bytes | None, int]:
    view = memoryview(blob)
    start = time.perf_counter()
    reader = ContainerReader(key, "tnt_bench", "art_bench")
    size = 0
    for offset in range(0, len(view), MIB):
        for plaintext in reader.update(view[offset:offset + MIB]):
            size += len(plaintext)
    size += len(reader.finalize())
    elapsed = time.perf_counter() - start
    return elapsed, reader.plaintext_sha256, size


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="bytes per measurement, in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    buffers = [os.urandom(MIB) for _ in range(16)]
    count, total = args.mib, args.mib * MIB
    expected = hashlib.sha256()
    for i in range(count):
        expected.update(buffers[i % len(buffers)])
    key = os.urandom(32)

    blob = container_bytes(buffers, count, key)  # what (d) reads; made once, outside the timings
    times: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": []}
    for _ in range(args.repeats):
        times["a"].append(aes_alone(buffers, count))
        times["b"].append(sha_alone(buffers, count))
        elapsed, digest, stored = container_encrypt(buffers, count, key)
        assert digest == expected.digest() and stored == len(blob), "container digest or size is wrong"
        times["c"].append(elapsed)
        elapsed, digest, size = container_decrypt(blob, key)
        assert digest == expected.digest() and size == total, "decrypted bytes differ"
        times["d"].append(elapsed)

    rate = {name: total / statistics.median(values) / 1e9 for name, values in times.items()}
    anchor = min(rate["a"], rate["b"])
    print(f"{args.mib} MiB per run, median of {args.repeats} (GB/s = 1e9 bytes/s)")
    print(f"  (a) AESGCM alone, 1 MiB encrypt_into   {rate['a']:7.2f} GB/s")
    print(f"  (b) hashlib.sha256 alone               {rate['b']:7.2f} GB/s")
    print(f"  (c) ContainerWriter encrypt + digest   {rate['c']:7.2f} GB/s")
    print(f"  (d) ContainerReader decrypt + verify   {rate['d']:7.2f} GB/s")
    ok = True
    for name, label in (("c", "encrypt"), ("d", "decrypt")):
        ratio = rate[name] / anchor
        ok &= ratio >= TARGET
        print(f"  {label} / min(a, b) = {ratio:.3f}  (target >= {TARGET}) {'ok' if ratio >= TARGET else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
