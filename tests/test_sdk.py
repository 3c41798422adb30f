"""SDK pieces that need no server: futures, exceptions, the plain (no torch) install."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tg_tinker
from conftest import REPO
from tensafe.api.common.v1 import common_pb2
from tg_tinker import FutureCancelledError, FutureHandle, FutureTimeoutError, TGTinkerError
from tg_tinker._transport import _REASON_TO_ERROR
from tg_tinker.futures import Outcome


def test_future_result_after_completion_from_another_thread() -> None:
    outcome: Outcome[int] = Outcome()
    fut = FutureHandle("f1", outcome=outcome)
    seen = []
    fut.add_done_callback(lambda f: seen.append(f.future_id))
    threading.Timer(0.05, outcome.set_result, args=(42,)).start()
    assert fut.result(timeout=5) == 42
    assert fut.done() and fut.exception() is None and seen == ["f1"]


def test_future_timeout_leaves_it_pending() -> None:
    outcome: Outcome[int] = Outcome()
    fut = FutureHandle("f2", outcome=outcome)
    start = time.monotonic()
    with pytest.raises(FutureTimeoutError):
        fut.result(timeout=0.05)
    assert time.monotonic() - start < 2 and not fut.done()
    outcome.set_result(1)
    outcome.set_result(2)  # the first completion wins
    assert fut.result(0) == 1


def test_future_error_is_raised_by_result() -> None:
    outcome: Outcome[int] = Outcome()
    fut = FutureHandle("f3", outcome=outcome)
    outcome.set_exception(tg_tinker.DPBudgetExceededError("spent", code="DP_BUDGET_EXCEEDED"))
    with pytest.raises(tg_tinker.DPBudgetExceededError):
        fut.result()
    assert isinstance(fut.exception(), tg_tinker.DPBudgetExceededError)


def test_future_cancel_asks_the_server() -> None:
    asked = []
    refused: FutureHandle[int] = FutureHandle("started", canceller=lambda fid: asked.append(fid) or False)
    assert refused.cancel() is False and not refused.done()
    accepted: FutureHandle[int] = FutureHandle("queued", canceller=lambda fid: asked.append(fid) or True)
    assert accepted.cancel() is True and accepted.cancelled()
    with pytest.raises(FutureCancelledError):
        accepted.result()
    assert asked == ["started", "queued"]
    assert accepted.cancel() is False  # already done


def test_exceptions_share_a_base_and_shadow_no_builtin() -> None:
    for name in tg_tinker.__all__:
        obj = getattr(tg_tinker, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, TGTinkerError)
            assert not hasattr(builtins, name), f"{name} shadows a builtin"


def test_every_server_reason_maps_to_an_sdk_exception() -> None:
    reasons = {n.removeprefix("ERROR_REASON_") for n in common_pb2.ErrorReason.keys()} - {"UNSPECIFIED"}
    assert reasons == set(_REASON_TO_ERROR)


def test_runtime_reasons_are_declared_in_the_contract() -> None:
    import re

    declared = {n.removeprefix("ERROR_REASON_") for n in common_pb2.ErrorReason.keys()}
    used = set()
    for path in Path(REPO / "services").rglob("*.py"):
        used |= set(re.findall(r'reason(?:=|\s*=\s*|: str = )"([A-Z_]+)"', path.read_text()))
    assert used and used <= declared, used - declared


def test_plain_sdk_import_needs_no_server_parts() -> None:
    script = ("import json, sys; import tg_tinker; c = tg_tinker.ServiceClient(api_key='x'); "
              "heavy = ('torch', 'sqlalchemy', 'transformers', 'cryptography', 'tensafe.runtime'); "
              "print(json.dumps(sorted(m for m in sys.modules if m.startswith(heavy))))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_version_is_exposed() -> None:
    from importlib.metadata import version

    # The SDK is its own distribution; the server, which pins it, has the same version.
    assert tg_tinker.__version__ == version("tg-tinker") == version("tensafe")


# The SDK's import graph (no cycle, nothing from the server): tests/test_import_graph.py.


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_tokens": 0}, "sampling.max_tokens"),
    ({"temperature": float("nan")}, "sampling.temperature"),
    ({"temperature": -1.0}, "sampling.temperature"),
    ({"top_p": 0.0}, "sampling.top_p"),
    ({"top_k": -1}, "sampling.top_k"),
    ({"num_samples": 65}, "sampling.num_samples"),
    ({"stop": ["s"] * 17}, "sampling.stop"),
])
def test_sampling_arguments_are_checked_here_with_the_shared_rules(kwargs, field) -> None:
    from tg_tinker import TrainingClient, ValidationError
    from tg_tinker.sampling import sampling_params
    from tg_tinker.two_plane import _check

    tc = object.__new__(TrainingClient)  # no session and no transport: the check must come before any call
    tc.session_id = "s"
    with pytest.raises(ValidationError) as info:
        tc.sample_async(["x"], **{"max_tokens": 4, **kwargs})
    assert (info.value.field, info.value.code) == (field, "INVALID_ARGUMENT")
    args = {"max_tokens": 4, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "stop": None, "seed": None,
            "num_samples": 1, "return_logprobs": False, **kwargs}
    with pytest.raises(ValidationError) as info:
        _check(sampling_params(**args))  # the two-plane generation, same rules
    assert (info.value.field, info.value.code) == (field, "INVALID_ARGUMENT")
