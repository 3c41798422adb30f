"""Generation through SDK + gRPC + the inference service, against transformers' generate in this process.

Anchor: the same base model with the same LoRA adapter (read from the same checkpoint) and
PEFT, ``model.generate`` greedy over the same prompts, one prompt at a time, in this process.
Measured: `tensafe up` in a subprocess; an adapter trained a few steps through the SDK and
saved to the vault, loaded into the inference service, and the same prompts streamed through
``SamplingClient.stream``. Both produce the same tokens (checked). Rounds are interleaved
(anchor, service, ...) and medians compared, because this machine is shared and noisy.

Printed: generated tokens per second (service over anchor, target >= 0.9) and first-token
latency (time to the first streamed token of the first prompt, against in-process generate
with max_new_tokens=1).

Then two-plane HE-LoRA generation (``enable_he_lora=True``): the base model in this process,
every LoRA layer (q_proj and v_proj of each block) under CKKS on the he service. Printed:
seconds per generated token after the first, beside the plaintext service's figure for the
same prompt, and the published anchor of 1.61 s per token (an 8-rank HE LoRA on a 6B model,
arXiv 2501.01672; another model and machine, so a reference, not a ratio).

    python bench/bench_inference.py [--models tiny smollm2] [--tokens 64] [--rounds 3] [--he-tokens 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same OpenMP policy as the server (see tensafe.cli)

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

TARGETS = ["q_proj", "v_proj"]
PROMPTS = ["Once upon a time", "The clinic opens at", "Please bring your insurance card", "The train to the city"]


def trained_adapter(client, model_ref: str) -> str:
    """A checkpoint artifact of an adapter trained 3 steps (so it is not the identity)."""
    from tg_tinker import LoRAConfig, OptimizerConfig, TrainingConfig

    cfg = TrainingConfig(model_ref=model_ref, batch_size=2, seed=0, optimizer=OptimizerConfig(learning_rate=1e-3),
                         lora_config=LoRAConfig(rank=16, alpha=32, dropout=0.0, target_modules=TARGETS))
    with client.create_training_client(cfg) as tc:
        ids = [[1, 20, 30, 40, 50, 60, 70, 80], [1, 21, 31, 41, 51, 61, 71, 81]]
        for _ in range(3):
            tc.forward_backward({"input_ids": ids, "labels": ids})
            tc.optim_step()
        return tc.save_state(include_optimizer=False).artifact_id


def in_process_model(model_dir: Path, adapter_tar: bytes):
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load as st_load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tensafe.inference.adapter import read_adapter

    adapter = read_adapter(adapter_tar)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    fields = {k: v for k, v in adapter.config.items() if k not in ("base_model_name_or_path", "revision")}
    model = get_peft_model(base, PeftConfig.from_peft_type(**fields))
    set_peft_model_state_dict(model, st_load(adapter.weights))
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, tokenizer, pad


def anchor_round(model, tokenizer, pad: int, tokens: int) -> tuple[float, float, list[list[int]]]:
    """(tokens/s, first-token seconds, outputs) of in-process greedy generate."""
    outputs, generated = [], 0
    with torch.no_grad():
        ids = torch.tensor([tokenizer(PROMPTS[0]).input_ids])
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                       pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt).input_ids])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            outputs.append(out[0, ids.shape[1]:].tolist())
            generated += len(outputs[-1])
        elapsed = time.perf_counter() - start
    return generated / elapsed, first, outputs


def service_round(sc, tokens: int) -> tuple[float, float | None, list[list[int]]]:
    outputs: dict[int, list[int]] = {}
    start = time.perf_counter()
    first = None
    for chunk in sc.stream(PROMPTS, max_tokens=tokens, temperature=0):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - start
        outputs.setdefault(chunk.prompt_index, []).extend(chunk.token_ids)
    elapsed = time.perf_counter() - start
    generated = sum(len(v) for v in outputs.values())
    return generated / elapsed, first, [outputs[i] for i in range(len(PROMPTS))]


def per_token(stream) -> tuple[float, float, list[int]]:
    """(seconds to the first token, seconds per token after it, token ids) of one streamed sequence."""
    start = time.perf_counter()
    stamps, ids = [], []
    for chunk in stream:
        if chunk.token_ids:
            stamps.append(time.perf_counter())
            ids += chunk.token_ids
    first = stamps[0] - start
    return first, (stamps[-1] - stamps[0]) / max(1, len(ids) - 1), ids


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its live children (the he service's mask workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if entry.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Window:
    """The he figures between two moments of a two-plane stream: the SDK's summed CallStats, wall time and
    CPU time of this process and of the server (with its mask workers)."""

    def __init__(self, inference, server_pid: int) -> None:
        self.inference, self.pid = inference, server_pid
        self.start = self._snap()

    def _snap(self):
        st = self.inference.total_stats
        return (time.perf_counter(), time.process_time(), cpu_seconds(self.pid), st.rpcs, st.rpc_ms,
                st.server_ms["total_ms"], st.server_ms["compute_ms"],
                st.server_ms["serialize_ms"] + st.server_ms["deserialize_ms"], st.encrypt_ms, st.decrypt_ms,
                st.counts["prepared_encryptions"], st.counts["encryptions"])

    def per_token(self, tokens: int) -> dict[str, float]:
        end = self._snap()
        d = [(b - a) / tokens for a, b in zip(self.start, end, strict=True)]
        names = ("wall", "cpu_client", "cpu_server", "rpcs", "rpc_ms", "server_ms", "server_compute_ms",
                 "server_serialize_ms", "encrypt_ms", "decrypt_ms", "masks_prepared", "masks_inline")
        return dict(zip(names, d, strict=True))


def print_breakdown(label: str, f: dict[str, float]) -> None:
    other = f["wall"] * 1e3 - f["rpc_ms"] - f["encrypt_ms"] - f["decrypt_ms"]
    print(f"    {label}: per token {f['wall']:.3f} s = {f['rpcs']:.0f} RPCs {f['rpc_ms']:.0f} ms (in the he service "
          f"{f['server_ms']:.0f} ms: compute {f['server_compute_ms']:.0f}, (de)serialise "
          f"{f['server_serialize_ms']:.0f}; transport and queueing {f['rpc_ms'] - f['server_ms']:.0f}) + encrypt "
          f"{f['encrypt_ms']:.0f} ms + decrypt {f['decrypt_ms']:.0f} ms + base model and the rest {other:.0f} ms; "
          f"mask encryptions {f['masks_prepared']:.0f} prepared, {f['masks_inline']:.0f} in requests; CPU "
          f"{f['cpu_client']:.2f} s here + {f['cpu_server']:.2f} s server and mask workers")


def two_plane(client, sc, artifact: str, model_dir: Path, tokens: int, server_pid: int, batch: int) -> None:
    from tg_tinker.he import HEKeyManager

    bundle = HEKeyManager(tenant_id="bench").generate_key_bundle(key_id="bench-two-plane")
    he_sc = client.create_sampling_client(artifact_id=artifact, enable_he_lora=True, key_bundle=bundle,
                                          base_model_ref=str(model_dir))
    tp = he_sc._two_plane
    inference = tp.runtime.inference
    try:
        p_first, p_tok, p_ids = per_token(sc.stream(PROMPTS[:1], max_tokens=tokens, temperature=0))
        # One sequence: figures from its first token (the prompt's pass) to its last.
        start = time.perf_counter()
        stamps, h_ids, window = [], [], None
        for chunk in he_sc.stream(PROMPTS[:1], max_tokens=tokens, temperature=0):
            if chunk.token_ids:
                stamps.append(time.perf_counter())
                h_ids += chunk.token_ids
                window = window or Window(inference, server_pid)
        h_first, h_tok = stamps[0] - start, (stamps[-1] - stamps[0]) / max(1, len(h_ids) - 1)
        assert window is not None, "two-plane generation streamed no token"
        one = window.per_token(max(1, len(h_ids) - 1))
        # Several sequences of one prompt length (token ids, cut to the shortest prompt) generate together.
        ids = [tp.tokenizer.encode(p) for p in PROMPTS]
        n = min(map(len, ids))
        prompts = [ids[i % len(ids)][:n] for i in range(batch)]
        want = {}
        for chunk in sc.stream(prompts, max_tokens=tokens, temperature=0):
            want.setdefault(chunk.prompt_index, []).extend(chunk.token_ids)
        got, window = {}, None
        for chunk in he_sc.stream(prompts, max_tokens=tokens, temperature=0):
            if chunk.token_ids:
                got.setdefault(chunk.prompt_index, []).extend(chunk.token_ids)
                window = window or Window(inference, server_pid)
        b_tok_n = sum(len(v) for v in got.values()) - len(got)
        assert window is not None, "two-plane generation streamed no token"
        many = window.per_token(max(1, b_tok_n))
        b_tok = many["wall"]
        b_same = sum(got.get(i) == want.get(i) for i in range(batch))
    finally:
        he_sc.unload()
    same = sum(1 for _ in zip(p_ids, h_ids, strict=False)) if p_ids == h_ids else \
        next(i for i, (a, b) in enumerate(zip(p_ids, h_ids, strict=False)) if a != b)
    print(f"  two-plane HE-LoRA, {len(tp.layers)} encrypted layers (q_proj/v_proj) in {len(set(tp.groups.values()))} "
          f"calls per round, {len(h_ids)} tokens, greedy:")
    print(f"    plaintext service      {p_tok:8.3f} s/token   first token {p_first:7.2f} s")
    print(f"    two-plane HE-LoRA      {h_tok:8.3f} s/token   first token {h_first:7.2f} s   "
          f"({h_tok / p_tok:.0f}x plaintext; target <= 1.0; published anchor 1.61 s/token, 6B model, r=8)")
    print(f"    {batch} sequences together {b_tok:8.3f} s per generated token ({b_tok / p_tok:.1f}x plaintext's one "
          f"sequence), greedy tokens equal to the plaintext service's in {b_same} of {batch} sequences")
    print_breakdown("one sequence", one)
    print_breakdown(f"{batch} sequences", many)
    print(f"    greedy tokens equal to plaintext: {same} of {len(p_ids)}")
    if same != len(p_ids) or b_same != batch:
        raise SystemExit("two-plane HE-LoRA generated other tokens than the plaintext adapter")


def plaintext_rounds(client, name: str, artifact: str, model_dir: Path, tokens: int, rounds: int) -> None:
    model, tokenizer, pad = in_process_model(model_dir, client.get_artifact(artifact))
    sc = client.create_sampling_client(artifact_id=artifact)
    service_round(sc, 4)  # warm-up: both sides
    anchor_round(model, tokenizer, pad, 4)
    a_rate, a_first, s_rate, s_first = [], [], [], []
    for _ in range(rounds):
        rate, first, expected = anchor_round(model, tokenizer, pad, tokens)
        a_rate.append(rate)
        a_first.append(first)
        rate, first, got = service_round(sc, tokens)
        s_rate.append(rate)
        s_first.append(first)
        if got != expected:
            raise SystemExit(f"{name}: the service generated other tokens than the in-process anchor")
    a, s = statistics.median(a_rate), statistics.median(s_rate)
    af, sf = statistics.median(a_first), statistics.median(s_first)
    print(f"{name}: {len(PROMPTS)} prompts x {tokens} new tokens, greedy, LoRA r=16 on {'/'.join(TARGETS)}, "
          f"median of {rounds} interleaved rounds")
    print(f"  in-process generate       {a:9.1f} tokens/s   first token {af * 1000:8.1f} ms")
    print(f"  SDK+gRPC+inference stream {s:9.1f} tokens/s   first token {sf * 1000:8.1f} ms")
    print(f"  ratio                     {s / a:9.3f} (target >= 0.9)      first token {sf / af:6.2f}x")


def bench(name: str, model_dir: Path, tokens: int, rounds: int, tmp: Path, he_tokens: int, he_batch: int = 4,
          he_only: bool = False) -> None:
    from bench_trainer import Server

    server = Server(model_dir.parent, tmp / name)
    try:
        with server.client() as client:
            artifact = trained_adapter(client, model_dir.name)
            if not he_only:
                plaintext_rounds(client, name, artifact, model_dir, tokens, rounds)
        if he_tokens:
            with server.client() as client:
                two_plane(client, client.create_sampling_client(artifact_id=artifact), artifact, model_dir, he_tokens,
                          server.proc.pid, he_batch)
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--he-tokens", type=int, default=6, help="tokens for two-plane HE-LoRA (0: skip it)")
    parser.add_argument("--he-batch", type=int, default=4, help="sequences generated together in two-plane HE-LoRA")
    parser.add_argument("--he-only", action="store_true", help="only two-plane HE-LoRA (skip the plaintext rounds)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.models:
            if name == "tiny":
                from tiny_model import build_tiny_model

                bench("tiny", build_tiny_model(tmp / "models" / "tiny"), args.tokens, args.rounds, tmp, args.he_tokens,
                      args.he_batch, args.he_only)
                continue
            from tensafe.common.models import prepare_smollm2

            try:
                model_dir = prepare_smollm2(REPO / ".tensafe" / "models")
            except RuntimeError as exc:
                print(f"smollm2: skipped ({exc})")
                continue
            bench("smollm2", model_dir, args.tokens, args.rounds, tmp, args.he_tokens, args.he_batch, args.he_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
