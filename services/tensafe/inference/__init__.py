"""The inference service. Its RPCs are filled in by issue #8 (inference)."""
