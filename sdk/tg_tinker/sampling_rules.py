"""The one set of rules for ``SamplingParams``, shared by the SDK and every service that samples.

The SDK checks a request before sending it (so a mistake fails at the call, naming the field), and the
trainer's ``Sample``, the inference service and the SDK's two-plane generation check what they receive
with the same function, so the limits cannot drift apart. Request-specific limits (tokens per call,
the model's context length, the vocabulary) stay with the service that knows them.

>>> from tensafe.api.common.v1 import common_pb2
>>> check_sampling(common_pb2.SamplingParams(max_tokens=16, temperature=0.7))
>>> check_sampling(common_pb2.SamplingParams(max_tokens=16, temperature=float("nan")))
Traceback (most recent call last):
...
tg_tinker.sampling_rules.SamplingParamError: sampling.temperature: must be a finite number >= 0 (0 is greedy)
"""

from __future__ import annotations

import math

from tensafe.api.common.v1 import common_pb2

__all__ = ["MAX_SAMPLES", "MAX_STOP_CHARS", "MAX_STOPS", "SamplingParamError", "check_sampling"]

MAX_SAMPLES = 64
MAX_STOPS = 16
MAX_STOP_CHARS = 256


class SamplingParamError(ValueError):
    """A sampling parameter out of range; ``field`` names it (``sampling.temperature``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def check_sampling(sp: common_pb2.SamplingParams, field: str = "sampling") -> None:
    """Raise :class:`SamplingParamError` for the first parameter of ``sp`` out of range.

    ``max_tokens`` > 0; ``temperature`` finite and >= 0 (0 is greedy); ``top_p`` finite in (0, 1];
    ``top_k`` >= 0 (0 disables it); ``num_samples`` in [0, 64] (0 means 1); at most 16 stop strings
    of at most 256 characters each (empty ones are ignored).
    """
    if sp.max_tokens <= 0:
        raise SamplingParamError(f"{field}.max_tokens", "must be > 0")
    if sp.HasField("temperature") and not (math.isfinite(sp.temperature) and sp.temperature >= 0):
        raise SamplingParamError(f"{field}.temperature", "must be a finite number >= 0 (0 is greedy)")
    if sp.HasField("top_p") and not (math.isfinite(sp.top_p) and 0 < sp.top_p <= 1):
        raise SamplingParamError(f"{field}.top_p", "must be in (0, 1]")
    if sp.HasField("top_k") and sp.top_k < 0:
        raise SamplingParamError(f"{field}.top_k", "must be >= 0 (0 disables it)")
    if not 0 <= sp.num_samples <= MAX_SAMPLES:
        raise SamplingParamError(f"{field}.num_samples", f"must be between 1 and {MAX_SAMPLES}")
    if len(sp.stop) > MAX_STOPS:
        raise SamplingParamError(f"{field}.stop", f"at most {MAX_STOPS} stop strings (got {len(sp.stop)})")
    for i, stop in enumerate(sp.stop):
        if len(stop) > MAX_STOP_CHARS:
            raise SamplingParamError(f"{field}.stop[{i}]", f"at most {MAX_STOP_CHARS} characters (got {len(stop)})")
