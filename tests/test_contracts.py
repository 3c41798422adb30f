"""The protobuf contracts: stubs fresh, buf lint clean, descriptors as designed.

Run with ``PYTHONPATH=sdk python -m pytest tests/test_contracts.py``.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from tg_tinker import services as service_table
from tg_tinker.services import GRPC_SERVICES, SERVICE_NAMES

REPO_ROOT = Path(__file__).resolve().parent.parent
BUF = REPO_ROOT / "node_modules" / ".bin" / "buf"

SERVICES = GRPC_SERVICES

# Read-only RPCs are named Get*/List*/Watch*/Describe*, except these, which are
# read-only too (pure computation or streamed reads whose responses must never be
# cached by an idempotency store: plaintext data keys, large ciphertexts, streams).
READ_PREFIXES = ("Get", "List", "Watch", "Describe")
READ_ONLY_EXCEPTIONS = {
    "tensafe.api.accountant.v1.AccountantService.CalibrateNoise",
    "tensafe.api.he.v1.HeService.ComputeDelta",
    "tensafe.api.he.v1.HeService.ComputeTokens",  # like ComputeDelta: nothing stored for replay
    "tensafe.api.vault.v1.VaultService.PullArtifact",
    "tensafe.api.vault.v1.VaultService.UnwrapDataKey",
    "tensafe.api.inference.v1.InferenceService.Generate",
}

# (full method name) -> (client_streaming, server_streaming) for every streaming RPC.
STREAMING = {
    "tensafe.api.trainer.v1.TrainerService.WatchFutures": (False, True),
    "tensafe.api.vault.v1.VaultService.PutArtifact": (True, False),
    "tensafe.api.vault.v1.VaultService.GetArtifact": (False, True),
    "tensafe.api.vault.v1.VaultService.PullArtifact": (False, True),
    "tensafe.api.inference.v1.InferenceService.Generate": (False, True),
}

# The only repeated floating-point fields allowed: small, per-token or per-
# hyper-parameter lists. Arrays of tensor size travel as common.v1.Tensor.
ALLOWED_REPEATED_FLOATS = {
    "tensafe.api.trainer.v1.OptimizerConfig.betas",
    "tensafe.api.trainer.v1.SampledSequence.logprobs",
    "tensafe.api.inference.v1.GenerateResponse.logprobs",
}
TENSOR_LIKE_NAMES = ("data", "values", "weights", "activations", "tensor", "gradient", "grad")

REQUIRED_ERROR_REASONS = {
    "API_KEY_MISSING",
    "API_KEY_INVALID",
    "API_KEY_REVOKED",
    "TENANT_MISMATCH",
    "RATE_LIMITED",
    "RESOURCE_NOT_FOUND",
    "INVALID_ARGUMENT",
    "ALREADY_EXISTS",
    "FAILED_PRECONDITION",
    "DP_BUDGET_EXCEEDED",
    "INTEGRITY_ERROR",
    "TENANT_SHREDDED",
    "INSECURE_PARAMETERS",
    "SECRET_KEY_REFUSED",
    "FUTURE_CANCELLED",
    "DEPENDENCY_UNAVAILABLE",
    "NOT_IMPLEMENTED",
    "INTERNAL",
}

FLOAT_TYPES = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


def _pb2(svc: str):
    return importlib.import_module(f"tensafe.api.{svc}.v1.{svc}_pb2")


def _file_descriptors():
    files = [importlib.import_module("tensafe.api.common.v1.common_pb2").DESCRIPTOR]
    files += [_pb2(svc).DESCRIPTOR for svc in SERVICES]
    return files


def _all_messages():
    def walk(message):
        yield message
        for nested in message.nested_types:
            yield from walk(nested)

    for file in _file_descriptors():
        for message in file.message_types_by_name.values():
            yield from walk(message)


def _all_methods():
    for svc, name in SERVICES.items():
        service = _pb2(svc).DESCRIPTOR.services_by_name[name]
        yield from service.methods


def test_generated_stubs_are_fresh():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_protos.py"), "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_namespace_package_has_no_init():
    # `tensafe` is a namespace package split between sdk/ and services/.
    assert not (REPO_ROOT / "sdk" / "tensafe" / "__init__.py").exists()


def test_buf_lint_is_clean():
    if not BUF.exists():
        if os.environ.get("TENSAFE_REQUIRE_BUF"):
            pytest.fail("buf is required (TENSAFE_REQUIRE_BUF) but node_modules/.bin/buf is missing: run `npm ci`")
        pytest.skip("buf not installed: run `npm ci` (node_modules/.bin/buf)")
    result = subprocess.run([str(BUF), "lint"], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("svc", sorted(SERVICES))
def test_service_descriptor_and_grpc_stubs_importable(svc):
    name = SERVICES[svc]
    service = _pb2(svc).DESCRIPTOR.services_by_name[name]
    assert service.full_name == f"tensafe.api.{svc}.v1.{name}"
    assert len(service.methods) > 0
    grpc_module = importlib.import_module(f"tensafe.api.{svc}.v1.{svc}_pb2_grpc")
    assert hasattr(grpc_module, f"{name}Stub")
    assert hasattr(grpc_module, f"{name}Servicer")
    assert hasattr(grpc_module, f"add_{name}Servicer_to_server")


def test_read_only_rpcs_and_only_those_have_no_side_effects():
    no_side_effects = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
    methods = {m.full_name: m for m in _all_methods()}
    assert READ_ONLY_EXCEPTIONS <= methods.keys()
    wrong = []
    for full_name, method in sorted(methods.items()):
        expected_read = method.name.startswith(READ_PREFIXES) or full_name in READ_ONLY_EXCEPTIONS
        is_read = method.GetOptions().idempotency_level == no_side_effects
        if expected_read != is_read:
            wrong.append(f"{full_name}: expected read-only={expected_read}, descriptor says {is_read}")
    assert not wrong, "\n".join(wrong)


def test_streaming_kinds():
    methods = {m.full_name: m for m in _all_methods()}
    for full_name, method in methods.items():
        expected = STREAMING.get(full_name, (False, False))
        assert (method.client_streaming, method.server_streaming) == expected, full_name


def test_request_and_response_names_follow_the_rpc():
    for method in _all_methods():
        assert method.input_type.name == f"{method.name}Request", method.full_name
        assert method.output_type.name == f"{method.name}Response", method.full_name


def test_tensor_is_dtype_shape_bytes():
    common = importlib.import_module("tensafe.api.common.v1.common_pb2")
    fields = {f.name: f for f in common.Tensor.DESCRIPTOR.fields}
    assert set(fields) == {"dtype", "shape", "data"}
    assert fields["dtype"].enum_type.full_name == "tensafe.api.common.v1.Dtype"
    assert fields["shape"].type == FieldDescriptor.TYPE_INT64
    assert fields["shape"].is_repeated
    assert fields["data"].type == FieldDescriptor.TYPE_BYTES
    assert not fields["data"].is_repeated


def test_no_tensor_travels_as_repeated_floats():
    offenders = []
    for message in _all_messages():
        for field in message.fields:
            if not field.is_repeated or field.type not in FLOAT_TYPES:
                continue
            if any(word in field.name for word in TENSOR_LIKE_NAMES):
                offenders.append(f"{field.full_name} (tensor-like name)")
            elif field.full_name not in ALLOWED_REPEATED_FLOATS:
                offenders.append(f"{field.full_name} (not in the allow-list)")
    assert not offenders, "use tensafe.api.common.v1.Tensor instead:\n" + "\n".join(offenders)


def test_error_reasons_cover_the_wire_names():
    common = importlib.import_module("tensafe.api.common.v1.common_pb2")
    names = {v.name for v in common.ErrorReason.DESCRIPTOR.values}
    assert all(n.startswith("ERROR_REASON_") for n in names)
    wire = {n.removeprefix("ERROR_REASON_") for n in names} - {"UNSPECIFIED"}
    assert REQUIRED_ERROR_REASONS <= wire, sorted(REQUIRED_ERROR_REASONS - wire)


def test_no_google_rpc_imports():
    # google/rpc protos are not vendored; errors inside messages use common.v1.ErrorDetail.
    for file in _file_descriptors():
        for dep in file.dependencies:
            assert not dep.name.startswith("google/rpc/"), f"{file.name} imports {dep.name}"


def test_checkpoint_metadata_round_trips_with_types():
    trainer = _pb2("trainer")
    request = trainer.SaveStateRequest(session_id="s", include_optimizer=True)
    request.metadata.update({"epoch": 1, "validation_loss": 0.42, "note": "x", "ok": True})
    decoded = trainer.SaveStateRequest.FromString(request.SerializeToString())
    assert decoded.metadata["epoch"] == 1
    assert decoded.metadata["validation_loss"] == 0.42
    assert decoded.metadata["note"] == "x"
    assert decoded.metadata["ok"] is True


def test_the_service_table_matches_the_protos():
    """tg_tinker.services is the one table of services: every proto service is in it, and nothing else."""
    in_protos = {p.parent.parent.name for p in (REPO_ROOT / "protos" / "tensafe" / "api").glob("*/v1/*.proto")
                 if any(line.startswith("service ") for line in p.read_text().splitlines())}
    assert set(SERVICE_NAMES) == in_protos
    for name in SERVICE_NAMES:
        module = importlib.import_module(service_table.proto_module(name))
        (service,) = module.DESCRIPTOR.services_by_name.values()
        assert service.full_name == service_table.full_name(name)


@pytest.mark.parametrize("svc", SERVICE_NAMES)
def test_every_servicer_method_is_typed_with_its_messages(svc):
    """servicer.py is typed: each RPC takes its request message (an iterator of them when the client streams)
    and returns its response (an iterator when the server streams), so basedpyright checks the conversions."""
    path = REPO_ROOT / "services" / "tensafe" / svc / "servicer.py"
    methods = {node.name: node for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.FunctionDef)}
    service = importlib.import_module(service_table.proto_module(svc)).DESCRIPTOR.services_by_name[SERVICES[svc]]
    wrong = []
    for method in service.methods:
        def name(msg):
            return f"{msg.file.name.rsplit('/', 1)[-1].removesuffix('.proto')}_pb2.{msg.name}"
        want_req = f"Iterator[{name(method.input_type)}]" if method.client_streaming else name(method.input_type)
        want_resp = f"Iterator[{name(method.output_type)}]" if method.server_streaming else name(method.output_type)
        node = methods.get(method.name)
        if node is None:
            wrong.append(f"{method.name}: not in {path.name}")
            continue
        args = node.args.args
        got = (ast.unparse(args[1].annotation) if len(args) > 1 and args[1].annotation else None,
               ast.unparse(args[2].annotation) if len(args) > 2 and args[2].annotation else None,
               ast.unparse(node.returns) if node.returns else None)
        if got != (want_req, "grpc.ServicerContext", want_resp):
            wrong.append(f"{method.name}: {got} != {(want_req, 'grpc.ServicerContext', want_resp)}")
    assert not wrong, "\n".join(wrong)
