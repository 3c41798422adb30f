"""The inference service: tenants' adapters from the vault on shared base models, streamed generation.

servicer.py (gRPC in/out, protos to plain values) -> service.py (adapters, tenancy, requests; generation.py:
what a request means) -> backend.py (one interface) with
hf_backend.py (transformers, default) and vllm_backend.py (vLLM, its own environment). See docs/inference.md.
"""
