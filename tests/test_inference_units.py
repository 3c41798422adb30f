"""The inference service's parts without a server: stream decoding, the chunk queue, the vLLM backend's refusals."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tensafe.inference.backend import ChunkQueue
from tensafe.inference.generation import LENGTH, STOP, Chunk, SequenceStream
from tensafe.runtime.errors import FailedPrecondition, InvalidArgument, NotImplementedYet


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)


def _feed(tokenizer, text: str, stops: list[str]) -> tuple[list[Chunk], Chunk]:
    seq = SequenceStream(tokenizer, 0, 0, stops, want_logprobs=True)
    chunks = []
    for i, token in enumerate(tokenizer(text, add_special_tokens=False).input_ids):
        chunk = seq.push(token, -0.1 * (i + 1))
        if chunk is not None:
            chunks.append(chunk)
    return chunks, seq.finish()


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer) -> None:
    chunks, last = _feed(tokenizer, "The quick brown fox jumps over the lazy dog.", ["brown fox", "lazy"])
    streamed = "".join(c.text for c in chunks)
    assert "b" not in streamed[len("The quick "):] and streamed.startswith("The quick")
    assert streamed + last.text == "The quick " and last.finish_reason == STOP
    ids = [t for c in [*chunks, last] for t in c.token_ids]
    assert tokenizer.decode(ids) in ("The quick ", "The quick")
    logprobs = [lp for c in [*chunks, last] for lp in c.logprobs]
    assert logprobs == pytest.approx([-0.1 * (i + 1) for i in range(len(ids))])


def test_without_stops_every_token_goes_out_at_once(tokenizer) -> None:
    text = "Hello, world! How are you today?"
    chunks, last = _feed(tokenizer, text, [])
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(chunks) == len(ids) and all(len(c.token_ids) == 1 for c in chunks)
    assert "".join(c.text for c in chunks) == text and last.text == "" and last.finish_reason == LENGTH


def test_eos_ends_the_sequence_and_is_kept(tokenizer) -> None:
    seq = SequenceStream(tokenizer, 1, 2, [], want_logprobs=False)
    ids = tokenizer("Hello", add_special_tokens=False).input_ids
    for t in ids:
        seq.push(t)
    assert seq.push(tokenizer.eos_token_id) is None and seq.stopped
    last = seq.finish()
    assert last.token_ids == [tokenizer.eos_token_id] and last.finish_reason == STOP and last.logprobs == []
    assert (last.prompt_index, last.sample_index) == (1, 2)


def test_chunk_queue_merges_increments_and_passes_errors_after_them() -> None:
    out = ChunkQueue(threading.Event())
    for i in range(3):
        out.put(Chunk(0, 0, f"a{i}", [i]))
    out.put(Chunk(0, 0, "", [], [], STOP))
    out.put(Chunk(1, 0, "b", [9]))
    out.close(InvalidArgument("x", "boom"))
    got = []
    with pytest.raises(InvalidArgument):
        for chunk in out:
            got.append(chunk)
    assert [(c.prompt_index, c.text, c.token_ids, c.finish_reason) for c in got] == \
        [(0, "a0a1a2", [0, 1, 2], STOP), (1, "b", [9], 0)]


def test_chunk_queue_ends_when_cancelled() -> None:
    cancelled = threading.Event()
    out = ChunkQueue(cancelled)
    cancelled.set()
    assert list(out) == []


def test_vllm_engine_without_vllm_names_the_extra(tmp_path) -> None:
    from tensafe.inference.vllm_backend import TenSafeAsyncEngine, TenSafeVLLMConfig

    try:  # vLLM is absent here by design (it needs CUDA torch): the refusal is what is tested
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed in this environment")
    engine = TenSafeAsyncEngine(TenSafeVLLMConfig(model=str(tmp_path), max_lora_rank=16))
    with pytest.raises(FailedPrecondition, match=r"tensafe\[vllm\].*docs/vllm.md"):
        asyncio.run(engine.initialize())
    with pytest.raises(FailedPrecondition, match="initialize"):
        engine.engine  # noqa: B018


def test_vllm_engine_refuses_two_plane_he_lora() -> None:
    from tensafe.inference.vllm_backend import TenSafeVLLMConfig

    with pytest.raises(NotImplementedYet, match="enable_he_lora=True"):
        TenSafeVLLMConfig(model="m", enable_he_lora=True, he_lora_adapter_path="/a.tssp")
    with pytest.raises(InvalidArgument, match="gpu_memory_utilization"):
        TenSafeVLLMConfig(model="m", gpu_memory_utilization=1.5)


# -- the gRPC edge: sampling parameters and backends as plain values ----------------------------------------
def test_sampling_params_pass_the_shared_rules_and_come_out_plain() -> None:
    from tensafe.api.common.v1 import common_pb2
    from tensafe.inference.generation import Sampling, sampling_from_proto

    plain = sampling_from_proto(common_pb2.SamplingParams(max_tokens=8, stop=["", "\n"]))
    assert plain == Sampling(max_tokens=8, temperature=1.0, top_p=1.0, top_k=0, num_samples=1, stops=["\n"],
                             seed=None, return_logprobs=False)
    sp = common_pb2.SamplingParams(max_tokens=4, temperature=0.0, top_p=0.5, top_k=3, num_samples=2, seed=0,
                                   return_logprobs=True)
    assert sampling_from_proto(sp) == Sampling(4, 0.0, 0.5, 3, 2, [], 0, True)  # seed 0 is a seed
    for bad, field in ((dict(temperature=float("nan")), "sampling.temperature"), (dict(top_p=0.0), "sampling.top_p"),
                       (dict(top_k=-1), "sampling.top_k"), (dict(num_samples=65), "sampling.num_samples"),
                       (dict(max_tokens=0), "sampling.max_tokens"), (dict(stop=["x"] * 17), "sampling.stop")):
        with pytest.raises(InvalidArgument) as err:
            sampling_from_proto(common_pb2.SamplingParams(**{"max_tokens": 4, **bad}))
        assert err.value.field == field


def test_backends_are_named_at_the_edge() -> None:
    from tensafe.api.inference.v1 import inference_pb2
    from tensafe.inference.servicer import backend_name

    assert backend_name(0) == "" and backend_name(inference_pb2.BACKEND_HF) == "hf"
    assert backend_name(inference_pb2.BACKEND_VLLM) == "vllm"
    with pytest.raises(InvalidArgument) as err:
        backend_name(99)
    assert err.value.field == "backend"
