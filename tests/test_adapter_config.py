"""Units of the two shared artifact decoders in the runtime: the strict tar reader (``tensafe.runtime.safetar``)
and the LoRA adapter allow-list (``tensafe.runtime.adapter_config``). The attacks through the services are in
tests/adversarial/test_artifacts.py."""

from __future__ import annotations

import io
import json
import struct
import tarfile

import pytest

from tensafe.runtime import adapter_config as ac
from tensafe.runtime.errors import InvalidArgument
from tensafe.runtime.safetar import read_tar

GIB = 1 << 30


# -- tars, made by hand where tarfile cannot make them -------------------------------------------------------
def _header(name: str, size: int, kind: bytes = b"0", *, magic: bytes = b"ustar\x0000", tail: bytes = b"",
            raw_size: bytes = b"") -> bytes:
    """One 512-byte tar header with a correct checksum; ``tail`` overwrites bytes from offset 345 (GNU's
    sparse map and realsize live there)."""
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = raw_size or f"{size:011o}\0".encode()
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:265] = magic
    if tail:
        h[345:345 + len(tail)] = tail
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}\0 ".encode()
    return bytes(h)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _pax(records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        rec = f" {key}={value}\n".encode()
        n = len(rec) + 1
        n = len(str(n + len(str(n)))) + len(rec)  # the length counts its own digits
        body += str(n).encode() + rec
    return _header("PaxHeader", len(body), b"x") + _pad(body)


def gnu_sparse_bomb(name: str = "adapter_model.safetensors", real: int = GIB) -> bytes:
    """A GNU (old format) sparse member: 512 stored bytes standing for ``real`` bytes, about 2.5 KB in all."""
    sparse_map = f"{real - 512:011o}\0".encode() + f"{512:011o}\0".encode()
    tail = b"\0" * (386 - 345) + sparse_map + b"\0" * (482 - 386 - len(sparse_map)) + b"\0" \
        + f"{real:011o}\0".encode()
    return _header(name, 512, b"S", magic=b"ustar  \0", tail=tail) + b"\1" * 512 + b"\0" * 1024


def pax_sparse_bomb(name: str = "adapter_model.safetensors", real: int = GIB) -> bytes:
    """A PAX 1.0 sparse member (GNU tar --sparse --format=posix): its map is in the data."""
    pax = _pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                "GNU.sparse.realsize": str(real)})
    data = _pad(b"1\n" + str(real - 512).encode() + b"\n512\n") + b"\1" * 512
    return pax + _header("GNUSparseFile.0/" + name[:80], len(data)) + data + b"\0" * 1024


def tar_of(files: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_with(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tars_written_by_tarfile_are_read(fmt: int) -> None:
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": bytes(range(256)) * 9, "empty": b""}
    assert read_tar(tar_of(files, fmt), max_bytes=1 << 20) == files
    long_name = "n" * 200  # a PAX path record or a GNU long name
    if fmt != tarfile.USTAR_FORMAT:
        assert read_tar(tar_of({long_name: b"x"}, fmt), max_bytes=1 << 20) == {long_name: b"x"}
    assert read_tar(tar_of(files, fmt), max_bytes=1 << 20, wanted={"empty"}) == {"empty": b""}


def _kind(kind: bytes, **attrs: object) -> bytes:
    info = tarfile.TarInfo("member")
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return tar_with(info)


REFUSED = {
    "gnu sparse": (gnu_sparse_bomb(), "sparse"),
    "pax sparse": (pax_sparse_bomb(), "sparse"),
    "symlink": (_kind(tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
    "hard link": (_kind(tarfile.LNKTYPE, linkname="adapter_config.json"), "hard link"),
    "directory": (_kind(tarfile.DIRTYPE), "directory"),
    "fifo": (_kind(tarfile.FIFOTYPE), "FIFO"),
    "char device": (_kind(tarfile.CHRTYPE), "character device"),
    "block device": (_kind(tarfile.BLKTYPE), "block device"),
    "contiguous": (_kind(tarfile.CONTTYPE), "contiguous"),
    "unknown type": (_header("member", 0, b"Z") + b"\0" * 1024, "type"),
    "path": (tar_of({"sub/adapter_config.json": b"{}"}), "no folders"),
    "dot dot": (tar_of({"..": b"{}"}), "no folders"),
    "absolute": (tar_of({"/etc/passwd": b"x"}), "no folders"),
    "backslash": (tar_of({"a\\b": b"x"}), "no folders"),
    "control character": (tar_of({"a\nb": b"x"}), "no folders"),
    "duplicate": (_header("a", 1) + _pad(b"1") + _header("a", 1) + _pad(b"2") + b"\0" * 1024, "twice"),
    "truncated member": (_header("a", 10_000) + _pad(b"short") + b"\0" * 1024, "declares 10000 bytes"),
    "huge declared size": (_header("a", 8 ** 11 - 1) + b"\0" * 1024, "declares"),
    "base-256 size": (_header("a", 0, raw_size=b"\x80" + GIB.to_bytes(11, "big")) + b"\0" * 1024, "base-256"),
    "bad checksum": (bytes([_header("a", 0)[0] ^ 1]) + _header("a", 0)[1:] + b"\0" * 1024, "checksum"),
    "pax size beyond the data": (_pax({"size": str(GIB)}) + _header("a", 0) + b"\0" * 1024, "declares"),
    "pax unknown key": (_pax({"GNU.volume.label": "x"}) + _header("a", 0) + b"\0" * 1024, "PAX"),
    "huge pax header": (_header("PaxHeader", 1 << 20, b"x") + b"\0" * 1024, "extended header"),
    "not a tar": (b"PK\x03\x04" + b"\0" * 600, "checksum"),
    "too short": (b"{}", "shorter"),
    "empty tar": (b"\0" * 1024, "no files"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_members(case: str) -> None:
    data, words = REFUSED[case]
    with pytest.raises(InvalidArgument) as err:
        read_tar(data, field="artifact_id", max_bytes=1 << 20)
    assert err.value.field == "artifact_id"
    assert words in err.value.message


def test_the_sparse_bomb_is_small_and_refused_before_anything_is_allocated() -> None:
    bomb = gnu_sparse_bomb()
    assert len(bomb) < 10_000
    assert tarfile.open(fileobj=io.BytesIO(bomb)).getmembers()[0].size == GIB  # what tarfile would allocate
    with pytest.raises(InvalidArgument, match="sparse"):
        read_tar(bomb, max_bytes=4 * GIB)


def test_limits_on_members_their_count_and_the_total() -> None:
    files = {f"f{i}": b"x" * 600 for i in range(5)}
    data = tar_of(files)
    assert len(read_tar(data, max_bytes=len(data))) == 5
    with pytest.raises(InvalidArgument, match="more than 4 members"):
        read_tar(data, max_bytes=1 << 20, max_members=4)
    with pytest.raises(InvalidArgument, match="limit"):
        read_tar(data, max_bytes=len(data) - 1)
    with pytest.raises(InvalidArgument, match="limit of 4096"):
        read_tar(tar_of({"big": b"y" * 5000}), max_bytes=4096)


# -- the adapter config allow-list ------------------------------------------------------------------------------
def good_config(**changes: object) -> dict:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
              "target_modules": ["v_proj", "q_proj"], "bias": "none", "init_lora_weights": True,
              "base_model_name_or_path": "tiny", "task_type": None}
    config.update(changes)
    return config


def test_a_peft_saved_config_is_accepted_and_reduced_to_the_allow_list(tmp_path) -> None:
    from peft import LoraConfig

    LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path)
    raw = (tmp_path / "adapter_config.json").read_bytes()
    out = ac.parse_adapter_config(raw)
    assert out == {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                   "target_modules": ["q_proj", "v_proj"], "exclude_modules": None, "bias": "none",
                   "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
                   "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    assert set(ac.lora_kwargs(out)) <= set(ac.LORA_FIELDS)
    LoraConfig(**ac.lora_kwargs(out))  # a valid LoraConfig


CATASTROPHIC = "(a|aa)+$(x+x+)+y"  # backtracks exponentially in re on a long enough subject

REFUSED_CONFIGS = [
    ("init_lora_weights", "pissa"), ("init_lora_weights", "pissa_niter_4"), ("init_lora_weights", "olora"),
    ("init_lora_weights", "loftq"), ("init_lora_weights", "eva"), ("init_lora_weights", "corda"),
    ("init_lora_weights", "orthogonal"), ("init_lora_weights", 1),
    ("layer_replication", [[0, 2], [1, 2]]), ("modules_to_save", ["lm_head"]), ("use_dora", True),
    ("loftq_config", {"loftq_bits": 4}), ("eva_config", {"rho": 2.0}), ("corda_config", {}),
    ("megatron_config", {}), ("megatron_core", "os"), ("trainable_token_indices", [1, 2]),
    ("target_parameters", ["mlp.experts.gate_up_proj"]), ("lora_bias", True), ("use_qalora", True),
    ("alora_invocation_tokens", [1]), ("ensure_weight_tying", True), ("auto_mapping", {"base_model_class": "x"}),
    ("task_type", "SEQ_CLS"), ("bias", "all"), ("bias", "lora_only"), ("peft_type", "IA3"),
    ("target_modules", ".*q_proj"), ("target_modules", "q_proj"), ("target_modules", [CATASTROPHIC]),
    ("target_modules", []), ("target_modules", [f"m{i}" for i in range(ac.MAX_TARGETS + 1)]),
    ("target_modules", ["a" * (ac.MAX_NAME + 1)]), ("target_modules", ["q_proj", "q_proj"]),
    ("target_modules", ["q_proj\n"]), ("target_modules", ["q_proj.*"]), ("target_modules", [".q_proj"]),
    ("exclude_modules", ".*"), ("rank_pattern", {CATASTROPHIC: 4}), ("alpha_pattern", {CATASTROPHIC: 8}),
    ("rank_pattern", {"q_proj": 0}), ("rank_pattern", {f"m{i}": 4 for i in range(ac.MAX_PATTERNS + 1)}),
    ("layers_pattern", "(layers|h)+"), ("layers_to_transform", [-1]), ("r", 0), ("r", True), ("r", 4.5),
    ("r", ac.MAX_RANK + 1), ("lora_alpha", float("inf")), ("lora_alpha", 0), ("lora_dropout", 1.0),
    ("fan_in_fan_out", "yes"), ("base_model_name_or_path", "x" * 1000), ("something_new", 1),
]


@pytest.mark.parametrize(("name", "value"), REFUSED_CONFIGS, ids=[f"{n}={str(v)[:20]}" for n, v in REFUSED_CONFIGS])
def test_refused_config_fields_are_named(name: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as err:
        ac.parse_adapter_config(json.dumps(good_config(**{name: value})).encode())
    assert err.value.field.split("[")[0] in (f"adapter_config.{name}", "adapter_config.peft_type")


def test_bounds_on_the_json_and_required_fields() -> None:
    with pytest.raises(InvalidArgument, match="at most"):
        ac.parse_adapter_config(json.dumps(good_config(pad="x" * ac.MAX_CONFIG_BYTES)).encode())
    with pytest.raises(InvalidArgument, match="not JSON"):
        ac.parse_adapter_config(b"[" * 60_000)  # nested past the recursion limit
    for missing in ("r", "target_modules"):
        config = good_config()
        del config[missing]
        with pytest.raises(InvalidArgument) as err:
            ac.validate_adapter_config(config)
        assert err.value.field == f"adapter_config.{missing}"
    assert ac.validate_adapter_config(good_config(bias="all"), allow_base_bias=True)["bias"] == "all"


def test_patterns_match_names_exactly_and_peft_gets_them_escaped() -> None:
    out = ac.validate_adapter_config(good_config(rank_pattern={"layers.0.self_attn.q_proj": 2},
                                                 alpha_pattern={"v_proj": 3}))
    assert ac.lookup(out["rank_pattern"], "model.layers.0.self_attn.q_proj", 4) == 2
    assert ac.lookup(out["rank_pattern"], "model.layers.0Xself_attn.q_proj", 4) == 4  # '.' is not a wildcard
    assert ac.lookup(out["rank_pattern"], "model.layers.10.self_attn.q_proj", 4) == 4
    assert ac.lookup(out["alpha_pattern"], "model.layers.1.self_attn.v_proj", 8) == 3
    assert ac.lora_kwargs(out)["rank_pattern"] == {r"layers\.0\.self_attn\.q_proj": 2}


def _st(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


def test_weights_must_be_lora_factors_of_targeted_modules() -> None:
    config = ac.validate_adapter_config(good_config())
    prefix = "base_model.model.model.layers.0.self_attn."
    good = {prefix + "q_proj.lora_A.weight": ("F32", [4, 64]), prefix + "q_proj.lora_B.weight": ("F32", [64, 4])}
    modules = ac.check_adapter_weights(ac.safetensors_header(_st(good)), config)
    assert set(modules) == {"model.layers.0.self_attn.q_proj"}
    for extra, words in (({prefix + "q_proj.base_layer.weight": ("F32", [64, 64])}, "not a LoRA factor"),
                         ({"base_model.model.lm_head.weight": ("F32", [4, 64])}, "not a LoRA factor"),
                         ({prefix + "q_proj.lora_A.other_session.weight": ("F32", [4, 64])}, "not a LoRA factor"),
                         ({prefix + "k_proj.lora_A.weight": ("F32", [4, 64]),
                           prefix + "k_proj.lora_B.weight": ("F32", [64, 4])}, "not in target_modules"),
                         ({prefix + "v_proj.lora_A.weight": ("F32", [5, 64]),
                           prefix + "v_proj.lora_B.weight": ("F32", [32, 5])}, "rank 5")):
        with pytest.raises(InvalidArgument, match=words) as err:
            ac.check_adapter_weights(ac.safetensors_header(_st({**good, **extra})), config)
        assert err.value.field == "adapter_model"
    with pytest.raises(InvalidArgument, match="lora_A only"):
        ac.check_adapter_weights(ac.safetensors_header(_st({prefix + "q_proj.lora_A.weight": ("F32", [4, 64])})),
                                 config)


_OUTSIDE = b'{"a": {"dtype": "F32", "shape": [9], "data_offsets": [0, 36]}}'


@pytest.mark.parametrize("data", [b"", b"\xff" * 8 + b"{}", struct.pack("<Q", 2) + b"[]",
                                  struct.pack("<Q", len(_OUTSIDE)) + _OUTSIDE,
                                  _st({"a": ("I64", [1])}), _st({"a": ("F32", [1 << 19, 2])})])
def test_safetensors_headers_are_checked_without_torch(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        ac.safetensors_header(data)
