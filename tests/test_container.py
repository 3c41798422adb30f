"""The encrypted artifact container: round trips, streaming, tamper detection and constant memory."""

from __future__ import annotations

import ast
import hashlib
import os
import random
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tg_tinker import container as tc
from tg_tinker.container import (
    DEFAULT_SEGMENT_SIZE,
    FORMAT_VERSION,
    TAG_SIZE,
    ContainerReader,
    ContainerWriter,
    decrypt_bytes,
    decrypt_chunks,
    encrypt_chunks,
    read_header,
    stored_size,
)
from tg_tinker.errors import IntegrityError

KEY = bytes(range(32))
TENANT, ART = "tnt_alpha", "art_0001"
SEG = 64


def seal(data: bytes, *, key: bytes = KEY, tenant: str = TENANT, artifact: str = ART, seg: int = SEG) -> bytes:
    return b"".join(encrypt_chunks([data], key, tenant, artifact, seg))


def split(blob: bytes) -> tuple[bytes, list[bytes]]:
    """Header and segments of a well-formed container."""
    header, length = read_header(blob)
    block = header.segment_size + TAG_SIZE
    body = blob[length:]
    return blob[:length], [body[i:i + block] for i in range(0, max(len(body), 1), block)]


def open_blob(blob: bytes, **kwargs) -> bytes:
    return decrypt_bytes(blob, kwargs.pop("key", KEY), kwargs.pop("tenant", TENANT), kwargs.pop("artifact", ART))


def rejects(blob: bytes, *, says: str | None = None, artifact: str = ART, **kwargs) -> IntegrityError:
    with pytest.raises(IntegrityError) as info:
        open_blob(blob, artifact=artifact, **kwargs)
    err = info.value
    assert err.code == "INTEGRITY_ERROR"
    assert err.details["artifact_id"] == artifact
    assert f"artifact {artifact}" in err.message
    if says is not None:
        assert says in err.message, err.message
    return err


# -- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 10 * SEG, 10 * SEG + 7])
def test_round_trip_and_digest(size):
    data = os.urandom(size)
    stream = encrypt_chunks([data], KEY, TENANT, ART, SEG)
    blob = b"".join(stream)
    assert open_blob(blob) == data
    result = stream.result
    assert result.plaintext_sha256 == hashlib.sha256(data).digest()
    assert result.plaintext_size == size
    header_len = read_header(blob)[1]
    assert result.stored_size == len(blob) == stored_size(size, header_len, SEG)
    assert len(split(blob)[1]) == max(1, -(-size // SEG))  # a full last segment is the final one, not an extra


def test_random_sizes_and_segment_sizes():
    rng = random.Random(4)
    for _ in range(40):
        seg = rng.choice([1, 3, 16, 64, 1000])
        data = rng.randbytes(rng.randrange(0, 5000))
        blob = seal(data, seg=seg)
        assert len(blob) == stored_size(len(data), read_header(blob)[1], seg)
        assert open_blob(blob) == data


def test_default_segment_size_round_trip():
    data = os.urandom(DEFAULT_SEGMENT_SIZE + 1)  # large enough to hash on the helper thread
    writer = ContainerWriter(KEY, TENANT, ART)
    parts = [writer.header, *writer.update(data), writer.finalize()]
    assert len(parts) == 3 and writer.plaintext_sha256 == hashlib.sha256(data).digest()
    reader = ContainerReader(KEY, TENANT, ART)
    plain = reader.update(b"".join(parts))
    plain.append(reader.finalize())
    assert b"".join(plain) == data and reader.plaintext_sha256 == writer.plaintext_sha256
    assert reader.plaintext_size == len(data) == writer.plaintext_size


def test_chunk_boundaries_are_irrelevant():
    data = os.urandom(5 * SEG + 9)
    writer = ContainerWriter(KEY, TENANT, ART, SEG)
    parts = [writer.header]
    for i in range(len(data)):  # one byte at a time, from a reused mutable buffer
        scratch = bytearray(data[i:i + 1])
        parts.extend(writer.update(scratch))
        scratch[0] ^= 0xFF  # the writer copied it
    parts.append(writer.finalize())
    blob = b"".join(parts)
    assert writer.plaintext_sha256 == hashlib.sha256(data).digest()
    assert open_blob(blob) == data

    reader = ContainerReader(KEY, TENANT, ART)
    out = []
    for i in range(len(blob)):  # the header too arrives one byte at a time
        out.extend(reader.update(blob[i:i + 1]))
    out.append(reader.finalize())
    assert b"".join(out) == data
    assert reader.plaintext_sha256 == hashlib.sha256(data).digest()

    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(blob)), 12))
    pieces = [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True)]
    assert b"".join(decrypt_chunks(pieces, KEY, TENANT, ART)) == data


def test_writer_keeps_a_full_segment_until_it_knows_whether_it_is_last():
    writer = ContainerWriter(KEY, TENANT, ART, SEG)
    assert writer.update(b"x" * SEG) == []
    assert len(writer.update(b"y")) == 1
    assert len(writer.finalize()) == 1 + TAG_SIZE


def test_identity_from_header_when_not_given():
    blob = seal(b"adapter bytes")
    header, _ = read_header(blob)
    assert (header.tenant_id, header.artifact_id, header.version) == (TENANT, ART, FORMAT_VERSION)
    assert decrypt_bytes(blob, KEY) == b"adapter bytes"
    assert b"".join(decrypt_chunks([blob], KEY, None, None)) == b"adapter bytes"


def test_unicode_identity():
    blob = seal(b"z" * 100, tenant="tnt_é", artifact="art_ü")
    assert decrypt_bytes(blob, KEY, "tnt_é", "art_ü") == b"z" * 100


def test_result_only_after_exhaustion_and_misuse_is_refused():
    stream = encrypt_chunks([b"abc"], KEY, TENANT, ART, SEG)
    with pytest.raises(RuntimeError):
        _ = stream.result
    list(stream)
    assert stream.result.plaintext_size == 3
    writer = ContainerWriter(KEY, TENANT, ART, SEG)
    writer.finalize()
    with pytest.raises(ValueError):
        writer.update(b"more")
    with pytest.raises(ValueError):
        ContainerWriter(b"short", TENANT, ART)
    with pytest.raises(ValueError):
        ContainerWriter(KEY, TENANT, ART, 0)
    with pytest.raises(ValueError):
        ContainerWriter(KEY, "", ART)


def test_plaintext_never_in_the_container():
    marker = b"TENSAFE-PLAINTEXT-MARKER-" * 8
    blob = seal(os.urandom(300) + marker + os.urandom(300), seg=1024)
    assert b"TENSAFE-PLAINTEXT-MARKER" not in blob


# -- tampering --------------------------------------------------------------------------------------------

DATA = bytes(range(256)) * 2 + b"tail"  # 8 full segments of 64 and a final one of 4 bytes


@pytest.fixture(scope="module")
def blob() -> bytes:
    return seal(DATA)


@pytest.mark.parametrize("identity_given", [True, False])
def test_every_header_byte_flip_is_detected(blob, identity_given):
    header, _ = split(blob)
    for i in range(len(header)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(IntegrityError) as info:
            if identity_given:
                decrypt_bytes(bytes(bad), KEY, TENANT, ART)
            else:
                decrypt_bytes(bytes(bad), KEY)
        if identity_given:
            assert info.value.details["artifact_id"] == ART and ART in info.value.message


def test_header_errors_say_what_is_wrong(blob):
    rejects(b"XSAF" + blob[4:], says="bad header")
    rejects(blob[:4] + bytes([2]) + blob[5:], says="unsupported format version 2")
    rejects(blob[:5] + (1 << 30).to_bytes(4, "big") + blob[9:], says="segment size")
    rejects(blob[:20], says="header is incomplete")
    rejects(b"", says="header is incomplete")
    with pytest.raises(IntegrityError, match="incomplete"):
        read_header(blob[:20])


def test_every_segment_and_tag_byte_flip_is_detected(blob):
    header, segments = split(blob)
    for n, segment in enumerate(segments):
        for i in sorted({0, len(segment) // 2, len(segment) - TAG_SIZE - 1, len(segment) - TAG_SIZE,
                         len(segment) - 1} - {-1}):
            bad = bytearray(segment)
            bad[i] ^= 0x80
            tampered = header + b"".join(segments[:n]) + bytes(bad) + b"".join(segments[n + 1:])
            rejects(tampered, says=f"segment {n}")


def test_reordered_segments(blob):
    header, s = split(blob)
    rejects(header + s[0] + s[2] + s[1] + b"".join(s[3:]), says="segment 1 failed authentication")


def test_dropped_middle_segment(blob):
    header, s = split(blob)
    rejects(header + s[0] + b"".join(s[2:]), says="segment 1 failed authentication")


def test_truncation_at_a_segment_boundary(blob):
    header, s = split(blob)
    rejects(header + b"".join(s[:-1]), says="truncated: final segment missing")
    rejects(header + s[0], says="truncated: final segment missing")
    rejects(header, says="truncated: final segment missing")


def test_truncation_mid_segment(blob):
    header, s = split(blob)
    rejects(header + b"".join(s[:3]) + s[3][:30], says="segment 3")
    rejects(header + b"".join(s[:3]) + s[3][:5], says="truncated: segment 3 is incomplete")
    rejects(blob[:-1], says="segment 8")


def test_trailing_data(blob):
    rejects(blob + b"\x00", says="segment 8")
    full = seal(b"q" * (2 * SEG))  # a full final segment: whatever follows it is recognised as trailing data
    rejects(full + b"garbage" * 20, says="trailing data after final segment 1")
    rejects(full + full[len(full) - SEG - TAG_SIZE:], says="trailing data after final segment 1")


def test_segment_spliced_from_another_artifact_under_the_same_key(blob):
    header, s = split(blob)
    for other in (seal(DATA), seal(DATA, artifact="art_0002")):  # same identity too: salt and prefix differ
        _, o = split(other)
        rejects(header + s[0] + o[1] + b"".join(s[2:]), says="segment 1 failed authentication")
        rejects(header + b"".join(s[:-1]) + o[-1], says="segment 8")


def test_header_swapped_from_another_artifact(blob):
    _, s = split(blob)
    other_header, _ = split(seal(DATA))  # same key, same tenant and artifact id
    rejects(other_header + b"".join(s), says="segment 0 failed authentication")
    renamed_header, _ = split(seal(DATA, artifact="art_0002"))
    rejects(renamed_header + b"".join(s), says="header identity mismatch")
    err = rejects(renamed_header + b"".join(s), artifact="art_0002", says="segment 0 failed authentication")
    assert err.details["artifact_id"] == "art_0002"


def test_wrong_identity_or_key(blob):
    rejects(blob, tenant="tnt_beta", says="header identity mismatch")
    rejects(blob, artifact="art_9999", says="header identity mismatch")
    rejects(blob, key=bytes(32), says="segment 0 failed authentication")


def test_streaming_reader_raises_mid_stream_without_releasing_forged_plaintext(blob):
    header, s = split(blob)
    bad = bytearray(s[2])
    bad[0] ^= 1
    got = []
    with pytest.raises(IntegrityError, match="segment 2"):
        for chunk in decrypt_chunks([header, s[0], s[1], bytes(bad), *s[3:]], KEY, TENANT, ART):
            got.append(chunk)
    assert b"".join(got) == DATA[:2 * SEG]  # only the authenticated segments before the forged one


# -- memory and imports -----------------------------------------------------------------------------------


def test_memory_is_constant_in_the_artifact_size():
    mib, total = 1 << 20, 64
    pattern = bytearray(os.urandom(mib))

    def plaintext() -> Iterator[bytes]:
        for i in range(total):
            pattern[0] = i
            yield bytes(pattern)  # a fresh 1 MiB object per chunk, as a file or a network stream gives

    expected = hashlib.sha256(b"".join(plaintext())).digest()
    tracemalloc.start()
    try:
        stream = encrypt_chunks(plaintext(), KEY, TENANT, ART)
        blob_size = 0

        def container() -> Iterator[bytes]:
            nonlocal blob_size
            for part in stream:
                blob_size += len(part)
                yield part

        digest = hashlib.sha256()
        for part in decrypt_chunks(container(), KEY, TENANT, ART):
            digest.update(part)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.digest() == expected == stream.result.plaintext_sha256
    assert blob_size == stream.result.stored_size
    assert peak < 10 * mib, f"peak {peak / mib:.1f} MiB while streaming {total} MiB through encrypt and decrypt"


def test_module_imports_only_stdlib_and_cryptography():
    """The vault and the SDK both use the container: every module of the package imports only the standard
    library, ``cryptography``, ``tg_tinker.errors`` and the package's own modules."""
    package = Path(tc.__file__).parent
    assert Path(tc.__file__).name == "__init__.py"
    files = sorted(package.glob("*.py"))
    assert {"__init__.py", "_header.py", "_cipher.py", "_stream.py"} <= {f.name for f in files}
    own: set[str] = set()
    for path in files:
        roots, ours = set(), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
                ours.update(alias.name for alias in node.names if alias.name.split(".")[0] == "tg_tinker")
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: a relative import"
                module = node.module or ""
                roots.add(module.split(".")[0])
                if module.split(".")[0] == "tg_tinker":
                    ours.add(module)
        third_party = {name for name in roots if name not in sys.stdlib_module_names and name != "__future__"}
        assert third_party <= {"cryptography", "tg_tinker"}, path.name
        assert {m for m in ours if not m.startswith("tg_tinker.container.")} <= {"tg_tinker.errors"}, path.name
        own |= ours
    assert "tg_tinker.errors" in own  # the walk really read the imports
