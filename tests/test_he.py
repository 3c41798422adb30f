"""HE-LoRA through `tensafe up`: adapters trained by the trainer, loaded by the he service from the
vault, deltas computed on ciphertexts and compared with PEFT's own LoRA delta on the same activations."""

from __future__ import annotations

import io
import sqlite3
import tarfile
import time

import grpc
import numpy as np
import pytest
import tenseal as ts
import torch

from tg_tinker import ConflictError, LoRAConfig, NotFoundError, OptimizerConfig, TrainingConfig, ValidationError
from tg_tinker.he import (
    AdapterEncryptionConfig,
    HEKeyManager,
    HESchemeParams,
    create_encrypted_runtime,
    create_private_inference_mode,
)

IDS = [[0, 45, 120, 77, 200, 31, 9, 150], [0, 99, 14, 230, 61, 7, 180, 42]]
ADAPTERS = {  # name -> (rank, alpha, modules): several shapes (64->64, 64->32, 64->128, 128->64) and ranks
    "attn": (8, 16, ["q_proj", "v_proj"]),
    "mlp": (4, 12, ["gate_proj", "down_proj"]),
}


class Recorder(grpc.UnaryUnaryClientInterceptor):
    """Keeps every request message the SDK sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.sent.append(request.SerializeToString())
        return continuation(client_call_details, request)


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def service(trainer_stack, recorder):
    client = trainer_stack.client(retry_count=2)
    transport = client._transport
    channel = transport.channel
    transport.channel = lambda name: grpc.intercept_channel(channel(name), recorder)  # every call the SDK makes
    yield client
    client.close()


@pytest.fixture(scope="module")
def checkpoints(service) -> dict[str, str]:
    """A few training steps per adapter, saved to the vault: name -> artifact id."""
    out = {}
    for name, (rank, alpha, modules) in ADAPTERS.items():
        config = TrainingConfig(model_ref="tiny", seed=3, batch_size=2,
                                lora_config=LoRAConfig(rank=rank, alpha=alpha, dropout=0.0, target_modules=modules),
                                optimizer=OptimizerConfig(name="adamw", learning_rate=2e-2))
        with service.create_training_client(config) as tc:
            for _ in range(3):
                tc.forward_backward({"input_ids": IDS})
                tc.optim_step()
            out[name] = tc.save_state().artifact_id
    return out


@pytest.fixture(scope="module")
def peft_model(service, checkpoints, tiny_model, tmp_path_factory):
    """PEFT's own model for each adapter, from the same checkpoint bytes (pulled and decrypted here)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models = {}
    for name, artifact in checkpoints.items():
        folder = tmp_path_factory.mktemp(name)
        with tarfile.open(fileobj=io.BytesIO(service.get_artifact(artifact))) as tar:
            tar.extractall(folder, filter="data")
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
        models[name] = PeftModel.from_pretrained(base, str(folder)).eval()
    return models


@pytest.fixture(scope="module")
def bundle():
    return HEKeyManager(tenant_id="default").generate_key_bundle(HESchemeParams(), key_id="tenant-key-1")


def peft_delta(model, module: str, x: torch.Tensor) -> np.ndarray:
    """PEFT's LoRA delta of ``module`` for x: the wrapped layer's output minus its base layer's."""
    layer = model.get_submodule("base_model.model." + module)
    with torch.no_grad():
        return (layer(x) - layer.base_layer(x)).double().numpy()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_deltas_equal_pefts_own_for_shapes_ranks_and_token_counts(service, checkpoints, peft_model, bundle) -> None:
    rng = np.random.default_rng(0)
    for name, (rank, _, modules) in ADAPTERS.items():
        runtime = create_encrypted_runtime(config=AdapterEncryptionConfig(rank=rank, encrypted_layers=modules),
                                           key_bundle=bundle, client=service, adapter=checkpoints[name])
        assert len(runtime.layers) == 2 * len(modules)  # two decoder blocks
        for layer in runtime.layers:
            info = runtime.inference.adapter.layer(layer)
            assert info.rank == rank and info.scaling == pytest.approx(ADAPTERS[name][1] / rank)
            # Block 0: one token (replicated) and [batch, tokens, d]; block 1: [tokens, d] (both column).
            shapes = [(1,), (2, 3)] if ".layers.0." in layer else [(5,)]
            for shape in [(*s, info.in_features) for s in shapes]:
                x = torch.tensor(rng.normal(0, 1, shape), dtype=torch.float32)
                delta = runtime.forward(x, layer=layer)
                assert isinstance(delta, torch.Tensor) and delta.shape == (*shape[:-1], info.out_features)
                want = peft_delta(peft_model[name], layer, x)
                assert np.abs(want).max() > 1e-4  # trained: B is no longer zero
                assert rel_err(delta.double().numpy(), want) < 1e-4, (name, layer, shape)
                stats = runtime.inference.last_stats
                assert stats.counts["rotations"] == 0
                assert stats.counts["multiplicative_depth"] == (1 if shape[0] == 1 else 2)
                assert stats.counts["plaintext_multiplies"] > 0 and stats.server_ms["compute_ms"] > 0


def test_private_inference_mode_and_several_layers_per_call(service, checkpoints, peft_model, bundle) -> None:
    inference = create_private_inference_mode(key_bundle=bundle, params=bundle.params, client=service,
                                              adapter=checkpoints["attn"], layers=["layers.1.self_attn.q_proj",
                                                                                   "layers.1.self_attn.v_proj"])
    x = np.random.default_rng(1).normal(0, 1, (4, 64))
    enc = inference.encrypt_input(x)
    out = inference.process(enc)
    deltas = inference.decrypt_output(out)
    assert set(deltas) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    for module, delta in deltas.items():
        assert rel_err(delta, peft_delta(peft_model["attn"], module, torch.tensor(x, dtype=torch.float32))) < 1e-4
    assert out.stats.counts["rotations"] == 0 and out.stats.request_bytes > enc.size_bytes * 0.99
    # One token: two layers, each 1 output per round at d = 64, each output re-randomised by a fresh
    # public-key encryption of its masks; the he service prepared them in its workers after the load.
    x1 = x[0]
    deadline = time.monotonic() + 60
    while True:
        out = inference.process(inference.encrypt_input(x1))
        counts = out.stats.counts
        assert counts["encryptions"] + counts["prepared_encryptions"] == 4 and counts["rotations"] == 0
        if counts["prepared_encryptions"] == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counts["prepared_encryptions"] == 4, counts
    for module, delta in inference.decrypt_output(out).items():
        assert rel_err(delta, peft_delta(peft_model["attn"], module, torch.tensor(x1, dtype=torch.float32))) < 1e-4


def test_no_secret_key_reaches_the_service_or_its_database(service, trainer_stack, recorder, bundle,
                                                           tmp_path) -> None:
    assert recorder.sent, "the other tests ran through the recorder"
    bundle.context.secret_key().data.save(str(tmp_path / "sk"))
    secret = (tmp_path / "sk").read_bytes()  # SEAL's own serialisation of the secret key
    probes = [secret[i:i + 32] for i in range(64, len(secret) - 32, len(secret) // 8)]
    for message in recorder.sent:
        assert not any(p in message for p in probes)
    # The registered context is public: the service and its database hold no secret key.
    info = service.he.get_context(bundle.key_id)
    assert not info.has_galois_keys and info.size_bytes <= 2 << 20
    db = sqlite3.connect(trainer_stack.data_dir / "he.db")
    blobs = [row[0] for row in db.execute("SELECT public_context FROM he_contexts")]
    assert blobs and all(not ts.context_from(b).has_secret_key() for b in blobs)
    # A context carrying a secret key is refused and not stored.
    with pytest.raises(ValidationError) as err:
        service.he.register_context("leaky", bundle.context.serialize(save_secret_key=True), bundle.params)
    assert err.value.code == "SECRET_KEY_REFUSED" and err.value.field == "public_context"
    assert db.execute("SELECT count(*) FROM he_contexts WHERE key_id = 'leaky'").fetchone()[0] == 0
    raw = (trainer_stack.data_dir / "he.db").read_bytes()
    assert not any(p in raw for p in probes)


def test_insecure_parameters_are_refused_by_the_service(service, bundle) -> None:
    from tensafe.api.he.v1 import he_pb2

    # The SDK refuses these before sending; a hand-made request must meet the service's own check.
    claim = he_pb2.HeSchemeParams(scheme=he_pb2.HE_SCHEME_CKKS, poly_modulus_degree=8192,
                                  coeff_mod_bit_sizes=[60, 40, 40, 60], global_scale=2.0 ** 40, security_level=256)
    with pytest.raises(ValidationError) as err:
        service.he._call("RegisterContext", he_pb2.RegisterContextRequest(
            key_id="weak", public_context=bundle.public_context(), params=claim))
    assert err.value.code == "INSECURE_PARAMETERS" and "118 bits" in str(err.value)
    assert "118" in err.value.details["limit"]


def test_another_tenants_context_adapter_and_computation_are_not_found(service, trainer_stack, checkpoints,
                                                                        bundle) -> None:
    from tensafe.api.he.v1 import he_pb2

    inference = create_private_inference_mode(key_bundle=bundle, client=service, adapter=checkpoints["attn"],
                                              layers=["layers.0.self_attn.q_proj"])
    first = service.he.compute_delta(he_pb2.ComputeDeltaRequest(
        adapter_id=inference.adapter.adapter_id, packing=he_pb2.PACKING_REPLICATED, num_tokens=1,
        ciphertexts=inference.encrypt_input(np.ones(64)).groups[0][1]))
    tokens = service.he.compute_tokens(he_pb2.ComputeTokensRequest(
        adapter_id=inference.adapter.adapter_id, ciphertexts=[bundle.encrypt_token(np.ones(4096))]))
    key = trainer_stack.cli("keys", "create", "--tenant", "mallory").stdout.strip().splitlines()[-1]
    with trainer_stack.client(api_key=key) as mallory:
        mine = HEKeyManager("mallory").generate_key_bundle(key_id="m1")
        mallory.he.register_context("m1", mine.public_context(), mine.params)
        for call in (lambda: mallory.he.get_context(bundle.key_id),
                     lambda: mallory.he.load_adapter(checkpoints["attn"], "m1"),
                     lambda: mallory.he.load_adapter(checkpoints["attn"], bundle.key_id),
                     lambda: mallory.he.get_adapter(inference.adapter.adapter_id),
                     lambda: mallory.he.unload_adapter(inference.adapter.adapter_id),
                     lambda: mallory.he.compute_delta(he_pb2.ComputeDeltaRequest(
                         adapter_id=inference.adapter.adapter_id, packing=he_pb2.PACKING_REPLICATED, num_tokens=1,
                         ciphertexts=[b"x"])),
                     lambda: mallory.he.compute_delta(he_pb2.ComputeDeltaRequest(
                         packing=he_pb2.PACKING_REPLICATED, computation_id=first.computation_id,
                         layer_inputs=[he_pb2.LayerInput(layer="q_proj", ciphertexts=[b"x"])])),
                     lambda: mallory.he.compute_tokens(he_pb2.ComputeTokensRequest(
                         adapter_id=inference.adapter.adapter_id, ciphertexts=[b"x"])),
                     lambda: mallory.he.compute_tokens(he_pb2.ComputeTokensRequest(
                         computation_id=tokens.computation_id, ciphertexts=[b"x"]))):
            with pytest.raises(NotFoundError):
                call()
        assert [c.key_id for c in mallory.he.list_contexts()] == ["m1"] and mallory.he.list_adapters() == []
    assert service.he.get_adapter(inference.adapter.adapter_id).layers[0].name == "model.layers.0.self_attn.q_proj"


def test_round_two_runs_once_per_computation(service, checkpoints, bundle) -> None:
    """Round 2's masks are fixed by round 1: a second round 2 on another input would let the key holder
    subtract them (and the re-randomisation) away, so the he service refuses it."""
    from tensafe.api.he.v1 import he_pb2

    inference = create_private_inference_mode(key_bundle=bundle, client=service, adapter=checkpoints["attn"],
                                              layers=["layers.0.self_attn.q_proj"])
    layer = inference.adapter.layer("layers.0.self_attn.q_proj")
    first = service.he.compute_delta(he_pb2.ComputeDeltaRequest(
        adapter_id=inference.adapter.adapter_id, packing=he_pb2.PACKING_REPLICATED, num_tokens=1,
        ciphertexts=inference.encrypt_input(np.ones(64)).groups[0][1]))
    slots = bundle.slot_count

    def round_two(u: np.ndarray):
        req = he_pb2.ComputeDeltaRequest(packing=he_pb2.PACKING_REPLICATED, computation_id=first.computation_id)
        req.layer_inputs.add(layer=layer.name, ciphertexts=[bundle.encrypt_token(np.tile(u, slots // layer.rank))])
        return service.he.compute_delta(req)

    assert len(round_two(np.zeros(layer.rank)).deltas) == 1
    with pytest.raises(ConflictError) as err:
        round_two(np.ones(layer.rank))
    assert "already run" in str(err.value)


def test_bad_input_names_the_field(service, checkpoints, bundle) -> None:
    from tensafe.api.he.v1 import he_pb2

    inference = create_private_inference_mode(key_bundle=bundle, client=service, adapter=checkpoints["mlp"],
                                              layers=["layers.0.mlp.gate_proj"])
    cases = [
        (he_pb2.ComputeDeltaRequest(adapter_id=inference.adapter.adapter_id, packing=he_pb2.PACKING_REPLICATED,
                                    num_tokens=1, ciphertexts=[b"not a ciphertext"]), "ciphertexts[0]"),
        (he_pb2.ComputeDeltaRequest(adapter_id=inference.adapter.adapter_id, num_tokens=1), "packing"),
        (he_pb2.ComputeDeltaRequest(adapter_id=inference.adapter.adapter_id, packing=he_pb2.PACKING_REPLICATED,
                                    num_tokens=1, ciphertexts=[bundle.encrypt(np.ones(64)).serialize()]),
         "ciphertexts[0]"),  # a TenSEAL vector, not the SEAL ciphertext one token is sent as
        (he_pb2.ComputeDeltaRequest(adapter_id=inference.adapter.adapter_id, packing=he_pb2.PACKING_REPLICATED,
                                    layers=["k_proj"], num_tokens=1, ciphertexts=[b""]), "layers"),
    ]
    for request, field in cases:
        with pytest.raises(ValidationError) as err:
            service.he.compute_delta(request)
        assert err.value.field == field, (field, err.value)
    # Columns: a TenSEAL vector, or one token's encryption (the wrong level), is refused by position.
    for bad in (bundle.encrypt(np.ones(4)).serialize(), bundle.encrypt_token(np.ones(4))):
        with pytest.raises(ValidationError) as err:
            service.he.append_input(he_pb2.AppendInputRequest(
                adapter_id=inference.adapter.adapter_id, layers=["gate_proj"], num_tokens=4, offset=0,
                ciphertexts=[bundle.encrypt_column(np.ones(4)), bad]))
        assert err.value.field == "ciphertexts[1]", err.value
    with pytest.raises(ValidationError) as err:
        service.he.load_adapter(checkpoints["mlp"], bundle.key_id, ["q_proj"])
    assert err.value.field == "layers"
    with pytest.raises(NotFoundError):
        service.he.load_adapter(checkpoints["mlp"], "no-such-key")
    with pytest.raises(ValidationError) as err:
        create_encrypted_runtime(config=AdapterEncryptionConfig(rank=16, encrypted_layers=["gate_proj"]),
                                 key_bundle=bundle, client=service, adapter=checkpoints["mlp"])
    assert err.value.field == "config.rank"


def test_compute_tokens_batches_tokens_and_layers_sharing_their_input(service, checkpoints, peft_model,
                                                                      bundle) -> None:
    """q_proj and v_proj of a block and several tokens in one ComputeTokens call per round: each token's
    deltas equal PEFT's, each output is a fresh public-key encryption of its masks, round 2 runs once."""
    from tensafe.api.he.v1 import he_pb2

    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    inference = create_private_inference_mode(key_bundle=bundle, client=service, adapter=checkpoints["attn"],
                                              layers=names)
    x = np.random.default_rng(5).normal(0, 1, (3, 64))
    deltas = inference.process_tokens(x)
    stats = inference.last_stats
    assert stats.rpcs == 2  # both rounds of all three tokens and both layers
    # d = 64: the 16 rank rows fit one output; round 2 (q: 64 outputs, v: 32, in blocks of r = 8) one too.
    assert stats.counts["encryptions"] + stats.counts["prepared_encryptions"] == 3 * 2
    assert stats.counts["plaintext_multiplies"] == 3 * 2 and stats.counts["rotations"] == 0
    for module in names:
        for t in range(3):
            want = peft_delta(peft_model["attn"], module, torch.tensor(x[t], dtype=torch.float32))
            assert rel_err(deltas[module][t], want) < 1e-4, (module, t)
    # A [batch, tokens, d] input keeps its shape; one token as [d].
    x3 = x.reshape(3, 1, 64)
    assert inference.process_tokens(x3)[names[1]].shape == (3, 1, 32)
    assert inference.process_tokens(x[0])[names[0]].shape == (64,)

    first = service.he.compute_tokens(he_pb2.ComputeTokensRequest(
        adapter_id=inference.adapter.adapter_id, layers=["q_proj", "v_proj"],
        ciphertexts=[bundle.encrypt_token(np.tile(x[0], 64)), bundle.encrypt_token(np.tile(x[1], 64))]))
    assert [s.layer for s in first.spans] == names and first.block_size == 64
    assert [(s.first_block, s.blocks) for s in first.spans] == [(0, 8), (8, 8)]
    assert [(s.first_block, s.blocks) for s in first.round_two_spans] == [(0, 64), (64, 32)]
    with pytest.raises(ValidationError) as err:  # one round-2 ciphertext per token of round 1
        service.he.compute_tokens(he_pb2.ComputeTokensRequest(computation_id=first.computation_id,
                                                              ciphertexts=[bundle.encrypt_token(np.zeros(8))]))
    assert err.value.field == "ciphertexts"
    second = he_pb2.ComputeTokensRequest(computation_id=first.computation_id,
                                         ciphertexts=[bundle.encrypt_token(np.zeros(8))] * 2)
    assert len(service.he.compute_tokens(second).tokens) == 2
    with pytest.raises(ConflictError):
        service.he.compute_tokens(second)
    # Bad requests name their field, before any work.
    adapter = inference.adapter.adapter_id
    ok = bundle.encrypt_token(np.tile(x[0], 64))
    cases = [
        (he_pb2.ComputeTokensRequest(adapter_id=adapter), "ciphertexts"),
        (he_pb2.ComputeTokensRequest(adapter_id=adapter, ciphertexts=[ok] * 65), "ciphertexts"),
        (he_pb2.ComputeTokensRequest(adapter_id=adapter, ciphertexts=[ok, b"junk"]), "ciphertexts[1]"),
        (he_pb2.ComputeTokensRequest(adapter_id=adapter, layers=["k_proj"], ciphertexts=[ok]), "layers"),
        (he_pb2.ComputeTokensRequest(computation_id=first.computation_id.replace("hec_", "hed_"),
                                     ciphertexts=[ok]), None),  # NOT_FOUND
    ]
    for request, field in cases:
        with pytest.raises((ValidationError, NotFoundError)) as err:
            service.he.compute_tokens(request)
        assert getattr(err.value, "field", None) == field, (field, err.value)
    mlp = create_private_inference_mode(key_bundle=bundle, client=service, adapter=checkpoints["mlp"])
    with pytest.raises(ValidationError) as err:  # gate_proj reads 64 features, down_proj 128: not one input
        service.he.compute_tokens(he_pb2.ComputeTokensRequest(
            adapter_id=mlp.adapter.adapter_id, layers=["layers.0.mlp.gate_proj", "layers.0.mlp.down_proj"],
            ciphertexts=[ok]))
    assert err.value.field == "layers"


def test_examples_run_against_tensafe_up(trainer_stack, tmp_path) -> None:
    import subprocess
    import sys

    from conftest import REPO

    env = dict(trainer_stack.env, TS_API_KEY=trainer_stack.api_key, TS_BASE_URL=trainer_stack.target,
               TS_HE_PASSPHRASE="a test passphrase")
    state, key = str(tmp_path / "he.json"), str(tmp_path / "he.bundle")

    def run(*args: str) -> str:
        out = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr
        return out.stdout

    setup = run("examples/privacy/he_lora_setup.py", "--model", "tiny", "--rank", "4", "--state", state,
                "--key-file", key)
    assert "HE-LoRA setup done" in setup and "Galois keys: False" in setup
    out = run("examples/inference/encrypted_inference.py", "--state", state, "--tokens", "6")
    assert "encrypted inference done" in out and out.count("rotations 0") == 2, out
