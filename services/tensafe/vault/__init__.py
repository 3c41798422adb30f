"""The vault service. Its RPCs are filled in by issue #4 (encrypted artifacts)."""
