"""The accountant service. Its RPCs are filled in by issue #6 (privacy accounting)."""
