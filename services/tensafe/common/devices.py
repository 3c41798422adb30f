"""Where the ML services put their base models, and in which dtype: ``TENSAFE_DEVICE``, ``TENSAFE_DTYPE``.

One resolver for the trainer, the inference service's ``hf`` backend and the distributed trainer:

* ``TENSAFE_DEVICE``: ``auto`` (the default: the first CUDA device when torch sees one, else the CPU),
  ``cpu``, ``cuda`` (the current CUDA device) or ``cuda:N``. A CUDA device that this process cannot
  see is a startup error naming ``TENSAFE_DEVICE``: a server asked for a GPU never runs on the CPU
  instead (no silent fallback).
* ``TENSAFE_DTYPE``: ``auto`` (the default: bfloat16 on a CUDA device that supports it, else float16
  on CUDA, float32 on the CPU), ``float32``, ``bfloat16`` or ``float16``. float16 on the CPU is
  refused (torch's CPU kernels for it are slow and incomplete); bfloat16 on a CUDA device without
  bf16 support is refused.

Only the frozen base weights take that dtype. What precision matters for stays in float32 whatever
the base is: the LoRA factors (PEFT keeps adapter weights of a bf16/fp16 base in float32 and casts the
layer's input to them), the optimizer state, and every DP quantity (per-sample gradient norms in
float64, the clipped sums and the Gaussian noise in float32: :mod:`tensafe.trainer.dp`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tensafe.runtime.config import ConfigError

DEVICE_SETTING = "TENSAFE_DEVICE"
DTYPE_SETTING = "TENSAFE_DTYPE"
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES: dict[str, torch.dtype | None] = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                          "float16": torch.float16}
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d{1,3}))?$")


@dataclass(frozen=True)
class Placement:
    """A resolved device and base-model dtype."""

    device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')}"


CPU_FLOAT32 = Placement(torch.device("cpu"), torch.float32)  # what a conversion or a test pins, whatever the env


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(text: str) -> torch.device:
    """``text`` as a device this process can use; ConfigError naming TENSAFE_DEVICE otherwise."""
    value = (text or "auto").strip().lower()
    m = _DEVICE_RE.fullmatch(value)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ConfigError(f"{DEVICE_SETTING}={text!r}: use one of {', '.join(DEVICES)}")
    kind, index = m.group(1), m.group(2)
    count = _cuda_count()
    if kind == "auto":
        return torch.device("cuda", 0) if count else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if count == 0:
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"{DEVICE_SETTING}={text!r} but {why} (torch {torch.__version__}); set "
                          f"{DEVICE_SETTING}=cpu, or install a CUDA build of torch on a machine with a GPU")
    n = int(index) if index is not None else torch.cuda.current_device()
    if n >= count:
        raise ConfigError(f"{DEVICE_SETTING}={text!r} but this process sees {count} CUDA device(s) "
                          f"(cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", n)


def resolve_dtype(text: str, device: torch.device) -> torch.dtype:
    """The base model's dtype on ``device``; ConfigError naming TENSAFE_DTYPE for one it cannot use."""
    value = (text or "auto").strip().lower()
    if value not in DTYPES:
        raise ConfigError(f"{DTYPE_SETTING}={text!r}: use one of {', '.join(DTYPES)}")
    dtype = DTYPES[value]
    cuda = device.type == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if dtype is None:
        return (torch.bfloat16 if bf16 else torch.float16) if cuda else torch.float32
    if dtype == torch.float16 and not cuda:
        raise ConfigError(f"{DTYPE_SETTING}=float16 is for CUDA devices; on the CPU use float32 or bfloat16")
    if dtype == torch.bfloat16 and cuda and not bf16:
        raise ConfigError(f"{DTYPE_SETTING}=bfloat16 but {device} does not support bfloat16; use float16")
    return dtype


def resolve(device: str = "auto", dtype: str = "auto") -> Placement:
    where = resolve_device(device)
    return Placement(where, resolve_dtype(dtype, where))


def from_env(environ: Mapping[str, str] | None = None) -> Placement:
    """The placement TENSAFE_DEVICE and TENSAFE_DTYPE name (both default to ``auto``)."""
    env = os.environ if environ is None else environ
    return resolve(env.get(DEVICE_SETTING, "auto"), env.get(DTYPE_SETTING, "auto"))


_configured: Placement | None = None


def configure(device: str = "auto", dtype: str = "auto") -> Placement:
    """Resolve the server's TENSAFE_DEVICE / TENSAFE_DTYPE settings (``ServerConfig.device``/``.dtype``,
    so a ``.env`` file counts too) and make them this process's default; a ConfigError stops the start."""
    global _configured
    _configured = resolve(device, dtype)
    return _configured


def default() -> Placement:
    """The placement a server configured (:func:`configure`), else what the environment names."""
    return _configured if _configured is not None else from_env()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's weights are on (its first parameter's)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
