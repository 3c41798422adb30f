"""Fuzzing the artifact readers (issue 13, item 6): the strict tar reader, the adapter config allow-list
and the safetensors header check answer anything malformed with InvalidArgument naming the field, and
nothing else. Mutations start from a valid adapter tar and from sparse-tar bombs."""

from __future__ import annotations

import json
import os
import random
import tarfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from test_adapter_config import gnu_sparse_bomb, pax_sparse_bomb, tar_of

from tensafe.runtime import adapter_config as ac
from tensafe.runtime.errors import InvalidArgument
from tensafe.runtime.safetar import read_tar

from .crafting import adapter_tar, config, weights

FUZZ = settings(max_examples=int(os.environ.get("TENSAFE_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


VALID_TAR = adapter_tar(config())


@st.composite
def mutated_tar(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([VALID_TAR, gnu_sparse_bomb(), pax_sparse_bomb(),
                                           tar_of({"a": b"x" * 700, "b" * 150: b"y"}, tarfile.GNU_FORMAT)])))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "overwrite", "fix_checksum"]))
        if kind == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=1024))
        elif kind == "overwrite" and len(data) >= 512:
            block = draw(st.integers(0, len(data) // 512 - 1)) * 512
            at = block + draw(st.sampled_from([0, 100, 124, 156, 257, 345, 386, 482, 483]))
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(chunk)] = chunk
        elif kind == "fix_checksum" and len(data) >= 512:
            block = draw(st.integers(0, len(data) // 512 - 1)) * 512
            header = data[block:block + 512]
            header[148:156] = b" " * 8
            data[block + 148:block + 156] = f"{sum(header):06o}\0 ".encode()
    return bytes(data)


@FUZZ
@given(mutated_tar())
def test_fuzz_the_tar_reader(data: bytes) -> None:
    try:
        files = read_tar(data, max_bytes=1 << 20)
    except InvalidArgument as exc:
        assert exc.field == "artifact_id"
        return
    assert sum(len(v) for v in files.values()) <= len(data)


def test_fuzz_the_tar_reader_on_random_bytes() -> None:
    rng = random.Random(13)
    for _ in range(500):
        data = rng.randbytes(rng.choice([0, 100, 511, 512, 1024, 3000]))
        with pytest.raises(InvalidArgument):
            read_tar(data, max_bytes=1 << 20)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=4), max_leaves=12)
FIELDS = sorted(set(config()) | {"unknown"})


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8), st.booleans())
def test_fuzz_the_adapter_config_validator(changes: dict, allow_bias: bool) -> None:
    raw = json.dumps(config(**changes)).encode()
    try:
        out = ac.parse_adapter_config(raw, allow_base_bias=allow_bias)
    except InvalidArgument as exc:
        assert exc.field.startswith("adapter_config")
        return
    assert set(out) <= set(ac.LORA_FIELDS) | {"peft_type", "base_model_name_or_path"}
    assert out["init_lora_weights"] in (True, False, "gaussian") and isinstance(out["target_modules"], list)
    assert all(ac.MODULE_NAME.fullmatch(k) for k in {**out.get("rank_pattern", {}), **out.get("alpha_pattern", {})})


@FUZZ
@given(st.sampled_from([st_save(weights()), st_save({"x": torch.zeros(3)})]).flatmap(
    lambda raw: st.tuples(st.just(raw), st.integers(0, len(raw) - 1), st.binary(min_size=1, max_size=8))))
def test_fuzz_the_safetensors_header_check(case: tuple) -> None:
    raw, at, chunk = case
    data = raw[:at] + chunk + raw[at + len(chunk):]
    try:
        header = ac.safetensors_header(data)
        ac.check_adapter_weights(header, ac.validate_adapter_config(config()))
    except InvalidArgument:
        return
