"""Per-tenant quotas of the vault and the he service (#13 item 12): stored bytes and artifacts per
tenant, unfinished HE computations per tenant, and the HE work one adapter may ask for (rank, width,
layers). Each is RESOURCE_EXHAUSTED with reason QUOTA_EXCEEDED naming its setting, refused before the
work (or, for an upload, as soon as it passes), and leaves nothing behind.

One `tensafe up` per database backend, with small limits.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import Stack, start_stack
from tg_tinker import LoRAConfig, OptimizerConfig, QuotaExceededError, TrainingConfig
from tg_tinker.he import HEKeyManager, HESchemeParams, create_private_inference_mode

MIB = 1 << 20
LIMITS = {"TENSAFE_QUOTA_STORED_MB": "1", "TENSAFE_QUOTA_ARTIFACTS": "3", "TENSAFE_QUOTA_HE_COMPUTATIONS": "2",
          "TENSAFE_HE_MAX_RANK": "4", "TENSAFE_HE_MAX_DIM": "64", "TENSAFE_HE_MAX_LAYERS": "2"}
IDS = [[0, 45, 120, 77, 200, 31, 9, 150], [0, 99, 14, 230, 61, 7, 180, 42]]


@pytest.fixture(scope="module")
def quota_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
                module_db_env: dict[str, str]) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("quotas"), {**module_db_env, **LIMITS,
                                                        "TENSAFE_MODEL_DIR": str(tiny_model.parent)})
    yield s
    assert s.process.stop() == 0, s.process.output()


def tenant_client(stack: Stack, name: str):
    out = stack.cli("keys", "create", "--tenant", f"{name}-{uuid.uuid4().hex[:6]}")
    assert out.returncode == 0, out.stderr
    return stack.client(api_key=out.stdout.strip().splitlines()[-1])


def blobs(stack: Stack) -> list[Path]:
    return [p for p in (stack.data_dir / "blobs").rglob("*") if p.is_file()]


# -- the vault ------------------------------------------------------------------------------------------


def test_a_streamed_put_past_the_stored_bytes_quota_stops_at_once_and_keeps_nothing(quota_stack: Stack) -> None:
    sent = []

    def upload() -> Iterator[bytes]:  # 64 MiB offered in 256 KiB chunks; the quota is 1 MiB
        for i in range(256):
            sent.append(i)
            yield bytes([i]) * (256 << 10)

    with tenant_client(quota_stack, "hoarder") as client, tenant_client(quota_stack, "bystander") as other:
        kept = client.artifacts.put(b"x" * (512 << 10), name="half")   # half the quota
        files = blobs(quota_stack)
        with pytest.raises(QuotaExceededError) as err:
            client.artifacts.put(upload(), name="too-big")
        assert err.value.grpc_code == "RESOURCE_EXHAUSTED" and err.value.code == "QUOTA_EXCEEDED"
        assert err.value.quota == "TENSAFE_QUOTA_STORED_MB" and int(err.value.limit) == MIB
        # The upload stopped when its running total passed the quota, not after the 64 MiB (what the client
        # produced is what gRPC's flow control let it buffer before the refusal came back: a few MiB).
        assert len(sent) < 64, f"{len(sent)} of 256 chunks were produced before the refusal"
        assert [a.artifact_id for a in client.list_artifacts()] == [kept.artifact_id]
        assert sorted(blobs(quota_stack)) == sorted(files)       # no partial blob left
        # What still fits is stored; what does not is refused by its exact stored size.
        fits = client.artifacts.put(b"y" * (256 << 10), name="fits")
        assert kept.stored_size_bytes + fits.stored_size_bytes < MIB
        with pytest.raises(QuotaExceededError):
            client.artifacts.put(b"z" * (300 << 10), name="does-not")
        # Another tenant's room is its own.
        other.artifacts.put(b"w" * (900 << 10), name="mine")
        # Deleting frees room.
        client.delete_artifact(kept.artifact_id)
        client.artifacts.put(b"z" * (300 << 10), name="now-fits")


def test_the_artifacts_quota_refuses_the_next_put_before_reading_it(quota_stack: Stack) -> None:
    sent = []

    def upload() -> Iterator[bytes]:  # 64 MiB offered
        for i in range(256):
            sent.append(i)
            yield b"a" * (256 << 10)

    with tenant_client(quota_stack, "collector") as client:
        ids = [client.artifacts.put(b"%d" % i, name=f"a{i}").artifact_id for i in range(3)]
        with pytest.raises(QuotaExceededError) as err:
            client.artifacts.put(upload(), name="fourth")
        assert err.value.quota == "TENSAFE_QUOTA_ARTIFACTS" and int(err.value.limit) == 3
        assert len(sent) < 64  # refused on the header: only what gRPC buffered was produced
        assert sorted(a.artifact_id for a in client.list_artifacts()) == sorted(ids)
        client.delete_artifact(ids[0])
        client.artifacts.put(b"again", name="fourth")


# -- the he service ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def he_tenant(quota_stack: Stack):
    """A tenant with two trained adapters: rank 8 on q, v (attn8) and rank 4 on q, v (attn4)."""
    client = tenant_client(quota_stack, "he")
    artifacts = {}
    for name, rank in (("attn8", 8), ("attn4", 4)):
        config = TrainingConfig(model_ref="tiny", seed=3, batch_size=2,
                                lora_config=LoRAConfig(rank=rank, alpha=2 * rank, dropout=0.0,
                                                       target_modules=["q_proj", "v_proj"]),
                                optimizer=OptimizerConfig(name="sgd", learning_rate=1e-2))
        with client.create_training_client(config) as tc:
            tc.forward_backward({"input_ids": IDS})
            tc.optim_step()
            artifacts[name] = tc.save_state(include_optimizer=False).artifact_id
    bundle = HEKeyManager(tenant_id="he").generate_key_bundle(HESchemeParams(), key_id="quota-key")
    yield client, artifacts, bundle
    client.close()


def test_he_work_caps_refuse_an_adapter_before_anything_is_prepared(he_tenant) -> None:
    client, artifacts, bundle = he_tenant
    cases = [("attn4", None, "TENSAFE_HE_MAX_LAYERS"),                          # 4 layers, at most 2
             ("attn8", ["layers.0.self_attn.q_proj"], "TENSAFE_HE_MAX_RANK")]   # rank 8, at most 4
    for name, layers, quota in cases:
        with pytest.raises(QuotaExceededError) as err:
            create_private_inference_mode(key_bundle=bundle, client=client, adapter=artifacts[name], layers=layers)
        assert err.value.quota == quota, err.value
        assert client.he.list_adapters() == []   # nothing loaded, nothing prepared
    ok = create_private_inference_mode(key_bundle=bundle, client=client, adapter=artifacts["attn4"],
                                       layers=["layers.0.self_attn.q_proj"])
    assert [ly.rank for ly in ok.adapter.layers] == [4]
    client.he.unload_adapter(ok.adapter.adapter_id)


def test_he_max_dim_names_its_setting(quota_stack: Stack, he_tenant) -> None:
    client, _, bundle = he_tenant
    config = TrainingConfig(model_ref="tiny", seed=3, batch_size=2,
                            lora_config=LoRAConfig(rank=2, alpha=4, dropout=0.0, target_modules=["gate_proj"]),
                            optimizer=OptimizerConfig(name="sgd", learning_rate=1e-2))
    with client.create_training_client(config) as tc:  # gate_proj is 64 -> 128: wider than 64
        artifact = tc.save_state(include_optimizer=False).artifact_id
    with pytest.raises(QuotaExceededError) as err:
        create_private_inference_mode(key_bundle=bundle, client=client, adapter=artifact,
                                      layers=["layers.0.mlp.gate_proj"])
    assert err.value.quota == "TENSAFE_HE_MAX_DIM" and int(err.value.limit) == 64
    client.delete_artifact(artifact)


def test_unfinished_he_computations_are_capped_per_tenant(he_tenant) -> None:
    from tensafe.api.he.v1 import he_pb2

    client, artifacts, bundle = he_tenant
    inference = create_private_inference_mode(key_bundle=bundle, client=client, adapter=artifacts["attn4"],
                                              layers=["layers.0.self_attn.q_proj"])
    layer = inference.adapter.layer("layers.0.self_attn.q_proj")

    def round_one():
        return client.he.compute_delta(he_pb2.ComputeDeltaRequest(
            adapter_id=inference.adapter.adapter_id, packing=he_pb2.PACKING_REPLICATED, num_tokens=1,
            ciphertexts=inference.encrypt_input(np.ones(64)).groups[0][1]))

    first, _second = round_one(), round_one()            # two tokens waiting for round 2: the quota
    with pytest.raises(QuotaExceededError) as err:
        round_one()
    assert err.value.quota == "TENSAFE_QUOTA_HE_COMPUTATIONS" and int(err.value.limit) == 2
    with pytest.raises(QuotaExceededError):  # a batched call (ComputeTokens) is one more computation too
        client.he.compute_tokens(he_pb2.ComputeTokensRequest(
            adapter_id=inference.adapter.adapter_id, ciphertexts=[bundle.encrypt_token(np.ones(bundle.slot_count))]))
    # Finishing one (its round 2) makes room: a finished computation gives way to a new one.
    req = he_pb2.ComputeDeltaRequest(packing=he_pb2.PACKING_REPLICATED, computation_id=first.computation_id)
    req.layer_inputs.add(layer=layer.name, ciphertexts=[bundle.encrypt_token(
        np.tile(np.zeros(layer.rank), bundle.slot_count // layer.rank))])
    client.he.compute_delta(req)
    assert round_one().computation_id
    with pytest.raises(QuotaExceededError):
        round_one()
    client.he.unload_adapter(inference.adapter.adapter_id)  # its computations go with it
    again = create_private_inference_mode(key_bundle=bundle, client=client, adapter=artifacts["attn4"],
                                          layers=["layers.0.self_attn.q_proj"])
    client.he.unload_adapter(again.adapter.adapter_id)
