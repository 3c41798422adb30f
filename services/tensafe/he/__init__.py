"""The he service. Its RPCs are filled in by issue #7 (HE-LoRA)."""
