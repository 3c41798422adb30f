"""A vault checkpoint as a PEFT adapter directory for the Hugging Face Hub, with a model card stating its DP
guarantee. Nothing is uploaded: the directory is what ``PeftModel.from_pretrained`` and ``huggingface-cli
upload`` take."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ValidationError

if TYPE_CHECKING:
    from ..artifacts import ArtifactInfo
    from ..client import ServiceClient

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_MEMBER_BYTES = 4 << 30
MAX_JSON_BYTES = 16 << 20


def _members(container_plaintext: bytes) -> dict[str, bytes]:
    """The checkpoint tar's adapter files and session.json (flat regular files only; nothing is extracted to disk
    by tarfile)."""
    wanted = {*ADAPTER_FILES, "session.json"}
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(container_plaintext), mode="r:") as tar:
        for member in tar:
            if member.name not in wanted:
                continue
            if not member.isreg() or member.size > (MAX_JSON_BYTES if member.name.endswith(".json")
                                                    else MAX_MEMBER_BYTES):
                raise ValidationError(f"the checkpoint's {member.name} is not a plain file of bounded size",
                                      field="artifact_id", code="INVALID_ARGUMENT")
            handle = tar.extractfile(member)
            assert handle is not None
            out[member.name] = handle.read()
    missing = [name for name in ADAPTER_FILES if name not in out]
    if missing:
        raise ValidationError(f"the artifact is not a TenSafe checkpoint or adapter (no {', '.join(missing)})",
                              field="artifact_id", code="INVALID_ARGUMENT")
    return out


@dataclass(frozen=True)
class ModelCard:
    """What the card states, from the checkpoint's session record and the vault's attested lineage."""

    artifact_id: str
    base_model: str
    session_id: str
    step: int
    rank: int
    target_modules: list[str]
    dp: dict[str, Any] | None          # the session's DP record (noise, clipping, sample rate, epsilon, delta)
    dp_covered: bool                   # every step in the ancestry DP and every ancestor attested
    lineage_attested: bool
    non_private_steps: int
    external_ancestry: bool
    sampling: str                      # "declared" (client-sampled batches) or "attested" (server-sampled)
    sha256: str

    def privacy_text(self) -> str:
        if self.dp is None:
            return ("**This adapter was trained without differential privacy.** It may reproduce parts of its "
                    "training data; do not publish it if that data is sensitive.")
        eps, delta = float(self.dp.get("spent_epsilon", 0.0)), float(self.dp.get("delta", 0.0))
        text = (f"Trained with DP-SGD: **({eps:.4g}, {delta:g})-differential privacy** at the level of one training "
                f"example, accounted with the privacy loss distribution (PLD) by the TenSafe accountant over "
                f"{self.dp.get('accounted_steps', 0)} steps (noise multiplier {self.dp.get('noise_multiplier')}, "
                f"per-example clipping norm {self.dp.get('max_grad_norm')}, Poisson sample rate "
                f"{self.dp.get('sample_rate')}).")
        if self.sampling == "declared":
            text += (" The batches were sampled by the client (declared): the guarantee assumes it sampled each "
                     "example independently at that rate.")
        else:
            text += " The batches were sampled by the TenSafe trainer itself (attested)."
        if not self.dp_covered:
            text += (f" **The epsilon does not cover these weights**: the ancestry has {self.non_private_steps} "
                     "non-private steps" + (" and weights from an unattested upload" if self.external_ancestry
                                            else "") + ".")
        return text

    def render(self) -> str:
        tags = ["peft", "lora", "tensafe"] + (["differential-privacy"] if self.dp is not None else [])
        front = "\n".join(["---", "library_name: peft", f"base_model: {json.dumps(self.base_model)}",
                           "tags:", *[f"- {t}" for t in tags], "---"])
        return (f"{front}\n\n# LoRA adapter `{self.artifact_id}`\n\nA LoRA adapter (rank {self.rank}, on "
                f"{', '.join(self.target_modules)}) for `{self.base_model}`, trained with TenSafe (session "
                f"`{self.session_id}`, step {self.step}).\n\n## Privacy\n\n{self.privacy_text()}\n\n## Provenance"
                f"\n\n- vault artifact `{self.artifact_id}`, plaintext SHA-256 `{self.sha256}`\n- lineage recorded "
                f"by the TenSafe services: {'yes' if self.lineage_attested else 'no (an uploaded artifact)'}\n- the "
                "steps, the budget and this checkpoint are entries of the deployment's audit ledger "
                "(`tensafe compliance report`)\n\n## Use\n\n```python\nfrom peft import PeftModel\nfrom "
                "transformers import AutoModelForCausalLM\n\nbase = AutoModelForCausalLM.from_pretrained("
                f"{json.dumps(self.base_model)})\nmodel = PeftModel.from_pretrained(base, \"path/to/this/dir\")\n"
                "```\n")


def export_peft(service: ServiceClient, artifact_id: str, out_dir: str | Path, *,
                base_model: str | None = None) -> ModelCard:
    """Pull ``artifact_id`` (encrypted), decrypt it here, and write ``adapter_config.json``,
    ``adapter_model.safetensors`` and ``README.md`` (the model card) into ``out_dir`` (new or empty).
    ``base_model``: the Hub id to name in the config and card (default: the session's model_ref)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValidationError(f"{out} exists and is not an empty directory", field="out_dir",
                              code="INVALID_ARGUMENT")
    info: ArtifactInfo = service.artifacts.describe(artifact_id)
    plaintext = service.artifacts.decrypt(service.artifacts.pull(artifact_id), expected_sha256=info.sha256)
    files = _members(plaintext)
    record: dict[str, Any] = json.loads(files.get("session.json", b"{}"))
    adapter_config: dict[str, Any] = json.loads(files["adapter_config.json"])
    base = base_model or str(adapter_config.get("base_model_name_or_path") or record.get("config", {}).get(
        "modelRef", ""))
    adapter_config["base_model_name_or_path"] = base
    lineage = info.lineage
    modules: Any = adapter_config.get("target_modules") or []
    card = ModelCard(
        artifact_id=artifact_id, base_model=base, session_id=str(record.get("session_id", info.session_id)),
        step=int(record.get("step", 0)), rank=int(adapter_config.get("r", 0)),
        target_modules=sorted(str(m) for m in (modules if isinstance(modules, list) else [modules])),  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
        dp=record.get("dp"), dp_covered=lineage.dp_covered and record.get("dp") is not None,
        lineage_attested=lineage.attested, non_private_steps=lineage.non_private_steps,
        external_ancestry=lineage.external_ancestry,
        sampling=("attested" if record["dp"].get("sampling") == "server" else "declared") if record.get("dp") else "",
        sha256=info.sha256)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    (out / "adapter_model.safetensors").write_bytes(files["adapter_model.safetensors"])
    (out / "README.md").write_text(card.render())
    return card
