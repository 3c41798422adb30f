"""The trainer service. Its RPCs are filled in by issue #3 (training sessions)."""
