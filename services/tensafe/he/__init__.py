"""The he service: tenants' public CKKS contexts and LoRA deltas computed on encrypted activations (HE-LoRA).

servicer.py (gRPC in/out) -> service.py (wiring) -> contexts.py (context checks), adapter_cache.py (adapters
and their weights), pending.py (computations and their quota), column.py and token.py (the two packings),
over compute.py (the CKKS arithmetic), masks.py/prepare.py (work done ahead) and store.py (SQL). Adapters are
read by tensafe.runtime.adapter_artifact. See docs/he.md.
"""
