"""The he service: tenants' public CKKS contexts and LoRA deltas computed on encrypted activations (HE-LoRA).

servicer.py (gRPC in/out) -> service.py (contexts, adapters, pending computations) -> compute.py (the
CKKS arithmetic) and store.py (SQL). See docs/he.md.
"""
