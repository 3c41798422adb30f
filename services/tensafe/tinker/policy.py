"""The Tinker gateway's operator settings and id checks: names, the hub-name -> local model mapping
(TENSAFE_TINKER_MODELS) and the per-tenant / per-key DP policies (TENSAFE_TINKER_POLICY_FILE)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tensafe.runtime.errors import InvalidArgument
from tg_tinker.configs import DPConfig
from tg_tinker.errors import TGTinkerError

MAX_NAME = 128
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ID_MAX = 200


def check_name(name: str, field_name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise InvalidArgument(field_name, "must be 1 to 128 letters, digits, '.', '_' or '-', starting with a "
                                          "letter or digit")
    return name


def check_id(value: object, field_name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= ID_MAX or not value.isprintable():
        raise InvalidArgument(field_name, f"must be an id of at most {ID_MAX} printable characters")
    return value


def parse_models(text: str) -> dict[str, str]:
    """TENSAFE_TINKER_MODELS: ``hub/name=local,...`` -> {hub name: local model name}."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        hub, sep, local = item.partition("=")
        if not sep or not hub.strip() or not local.strip():
            raise ValueError(f"TENSAFE_TINKER_MODELS: {item!r} is not hub-name=local-name")
        out[hub.strip()] = local.strip()
    return out


@dataclass(frozen=True)
class DPPolicy:
    """DP settings every model of a tenant (or API key) gets; the ``tinker`` client cannot send them."""

    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    batch_size: int
    dataset_size: int | None = None
    sample_rate: float | None = None
    max_steps: int | None = None
    noise_multiplier: float | None = None
    accountant_type: str = "pld"

    def config(self) -> DPConfig:
        return DPConfig(enabled=True, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                        target_epsilon=self.target_epsilon, target_delta=self.target_delta,
                        accountant_type=self.accountant_type, dataset_size=self.dataset_size,
                        sample_rate=self.sample_rate, max_steps=self.max_steps)


def load_policies(path: str) -> tuple[dict[str, DPPolicy], dict[str, DPPolicy]]:
    """TENSAFE_TINKER_POLICY_FILE -> (DP policy by tenant id, by API key id). Operator input: checked at start.

    ``{"tenants": {"<tenant>": {"dp": {...}}}, "keys": {"<key id>": {"dp": {...}}}}``; ``dp`` takes
    target_epsilon, target_delta, max_grad_norm, batch_size (expected rows per step), dataset_size or
    sample_rate, and optionally max_steps, noise_multiplier, accountant_type."""
    if not path:
        return {}, {}
    raw = json.loads(Path(path).read_text())
    out: list[dict[str, DPPolicy]] = []
    for section in ("tenants", "keys"):
        entries: dict[str, DPPolicy] = {}
        for who, policy in (raw.get(section) or {}).items():
            dp = policy.get("dp")
            if dp is None:
                continue
            try:
                entries[who] = DPPolicy(**dp)
                entries[who].config()  # the SDK's own checks of the values
            except (TypeError, TGTinkerError) as exc:
                raise ValueError(f"TENSAFE_TINKER_POLICY_FILE {section}.{who}.dp: {exc}") from None
        out.append(entries)
    return out[0], out[1]
