"""Attacks with crafted artifacts (issue 13 items 1, 3 and 6): adapter configs that rewrite or restructure the
shared base model, adapter weights that name base weights or another session's adapter, tenant regular
expressions, and sparse tars that declare far more bytes than they hold.

Defences under test: the one adapter allow-list (``tensafe.runtime.adapter_config``) used by inference, the
trainer's ``load_state`` and the he service; the one strict tar reader (``tensafe.runtime.safetar``). The base
model is compared bit for bit (every parameter, buffer and module name) in-process, and through a real
`tensafe up` by the base model's greedy log-probabilities, before and after every refused and accepted load.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from test_adapter_config import CATASTROPHIC, gnu_sparse_bomb, pax_sparse_bomb, tar_of

from tensafe.runtime.errors import InvalidArgument
from tensafe.runtime.safetar import read_tar
from tg_tinker import LoRAConfig, OptimizerConfig, TrainingConfig, ValidationError

from .crafting import RANK, adapter_tar, config, weights

PROMPTS = ["Once upon a time", "The clinic opens at"]


BASE_Q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
BASE_HEAD = "base_model.model.lm_head.weight"

# Configs PEFT would act on (rewrite base weights, add layers or whole-module copies, read as regex), and the
# field that must be named. Weights fit the tiny model, so nothing but the config is wrong.
BAD_CONFIGS = {
    "pissa": ({"init_lora_weights": "pissa"}, "adapter_config.init_lora_weights"),
    "olora": ({"init_lora_weights": "olora"}, "adapter_config.init_lora_weights"),
    "pissa_niter": ({"init_lora_weights": "pissa_niter_2"}, "adapter_config.init_lora_weights"),
    "orthogonal": ({"init_lora_weights": "orthogonal"}, "adapter_config.init_lora_weights"),
    "layer_replication": ({"layer_replication": [[0, 2], [1, 2]]}, "adapter_config.layer_replication"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "adapter_config.modules_to_save"),
    "task_type": ({"task_type": "SEQ_CLS"}, "adapter_config.task_type"),
    "trainable_tokens": ({"trainable_token_indices": [3, 4]}, "adapter_config.trainable_token_indices"),
    "dora": ({"use_dora": True}, "adapter_config.use_dora"),
    "lora_bias": ({"lora_bias": True}, "adapter_config.lora_bias"),
    "bias_all": ({"bias": "all"}, "adapter_config.bias"),
    "regex_targets": ({"target_modules": r".*\.(q|v)_proj"}, "adapter_config.target_modules"),
    "regex_rank_pattern": ({"rank_pattern": {CATASTROPHIC: 4}}, "adapter_config.rank_pattern"),
    "regex_alpha_pattern": ({"alpha_pattern": {"(.*.*)*q_proj": 8}}, "adapter_config.alpha_pattern"),
    "regex_layers_pattern": ({"layers_pattern": "(layers|h)+", "layers_to_transform": [0]},
                             "adapter_config.layers_pattern"),
    "unknown_field": ({"future_option": True}, "adapter_config.future_option"),
}
BAD_WEIGHTS = {  # an accepted config, tensors that would be written into the base model by PEFT's load
    "base_layer_weight": {**weights(), BASE_Q: torch.zeros(64, 64)},
    "lm_head": {**weights(), BASE_HEAD: torch.zeros(384, 64)},
}


def _field(err: pytest.ExceptionInfo) -> str:
    return err.value.field.split("[")[0]


# -- the base model's state, bit for bit -------------------------------------------------------------------------
def digest(model: torch.nn.Module, base_view: bool = False) -> str:
    """Every module name and type, every parameter and buffer (name, dtype, shape, bytes). ``base_view``
    leaves out the LoRA parts PEFT adds (and its ``base_layer`` renaming), to compare with an adapter loaded."""
    h = hashlib.sha256()

    def keep(name: str) -> str | None:
        if not base_view:
            return name
        if "lora_" in name or "lora_dropout" in name:
            return None
        return name.replace("base_model.model.", "").replace(".base_layer", "")

    for name, module in model.named_modules():
        shown = keep(name)
        if shown is not None and not (base_view and type(module).__module__.startswith("peft")):
            h.update(f"{shown}:{type(module).__name__};".encode())
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        shown = keep(name)
        if shown is not None:
            h.update(f"{shown}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def hf_base(tiny_model: Path):
    from tensafe.common.models import ModelLocation
    from tensafe.inference.hf_backend import HFBase

    base = HFBase(ModelLocation(tiny_model, None, str(tiny_model)))
    yield base
    base.close()


def _base_state(base) -> str:
    assert base.peft is None
    return digest(base.model)


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS) + sorted(BAD_WEIGHTS))
def test_a_refused_adapter_leaves_the_inference_base_bit_identical(hf_base, case: str) -> None:
    from tensafe.inference.adapter import read_adapter

    before = _base_state(hf_base)
    if case in BAD_CONFIGS:
        changes, field = BAD_CONFIGS[case]
        data = adapter_tar(config(**changes))
    else:
        data, field = adapter_tar(config(), BAD_WEIGHTS[case]), "adapter_model"
    refused = None
    try:
        hf_base.add_adapter("adp_x", read_adapter(data))
    except InvalidArgument as exc:
        refused = exc
    after = digest(hf_base.model, base_view=True)  # the base part, whether or not the adapter stayed
    if refused is None:
        hf_base.remove_adapter("adp_x")
    assert after == before, "the load changed the shared base model"
    assert refused is not None and refused.field.split("[")[0] == field
    assert _base_state(hf_base) == before


def test_an_accepted_adapter_does_not_alter_the_base_either(hf_base) -> None:
    from tensafe.inference.adapter import read_adapter

    raw = digest(hf_base.model)
    view = digest(hf_base.model, base_view=True)
    patterned = config(rank_pattern={"layers.1.self_attn.v_proj": 2}, alpha_pattern={"q_proj": 16})
    tensors = weights()
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    tensors[f"{prefix}.lora_A.weight"] = tensors[f"{prefix}.lora_A.weight"][:2].contiguous()
    tensors[f"{prefix}.lora_B.weight"] = tensors[f"{prefix}.lora_B.weight"][:, :2].contiguous()
    for name, data in (("adp_good", adapter_tar(config())), ("adp_pattern", adapter_tar(patterned, tensors))):
        hf_base.add_adapter(name, read_adapter(data))
        assert digest(hf_base.peft.base_model.model, base_view=True) == view
    # The escaped rank_pattern key reached PEFT as an exact name: layer 1's v_proj has rank 2, layer 0's 4.
    layers = hf_base.peft.base_model.model.model.layers
    assert layers[1].self_attn.v_proj.r["adp_pattern"] == 2 and layers[0].self_attn.v_proj.r["adp_pattern"] == 4
    assert layers[0].self_attn.q_proj.scaling["adp_pattern"] == 16 / RANK
    loaded = hf_base.peft.base_model.model.model.layers[0].self_attn.q_proj.lora_A["adp_good"].weight
    assert torch.equal(loaded, weights()["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    hf_base.remove_adapter("adp_good")
    hf_base.remove_adapter("adp_pattern")
    assert _base_state(hf_base) == raw


def test_the_he_service_refuses_the_same_configs() -> None:
    from tensafe.he import adapters as he_adapters

    for changes, field in BAD_CONFIGS.values():
        files = read_tar(adapter_tar(config(**changes)))
        with pytest.raises(InvalidArgument) as err:
            he_adapters.parse(files)
        assert _field(err) == field
    for tensors in BAD_WEIGHTS.values():
        with pytest.raises(InvalidArgument) as err:
            he_adapters.parse(read_tar(adapter_tar(config(), tensors)))
        assert _field(err) == "adapter_model"
    # rank_pattern keys are names, matched by name or suffix: a key with regex syntax is refused, and a
    # plain key applies only to the modules it names.
    tensors = weights()
    for part, cut in (("lora_A", slice(0, 2)), ("lora_B", None)):
        key = f"base_model.model.model.layers.1.self_attn.v_proj.{part}.weight"
        tensors[key] = (tensors[key][cut] if part == "lora_A" else tensors[key][:, :2]).contiguous()
    layers = he_adapters.parse(read_tar(adapter_tar(config(rank_pattern={"layers.1.self_attn.v_proj": 2}),
                                                    tensors)))
    assert layers["model.layers.1.self_attn.v_proj"].rank == 2 and layers["model.layers.0.self_attn.v_proj"].rank == 4


def test_the_three_readers_apply_one_set_of_rules() -> None:
    """Inference, he and the trainer read adapter artifacts through tensafe.runtime.adapter_artifact: the same
    artifact is refused by each, naming the same field."""
    from tensafe.he import adapters as he_adapters
    from tensafe.inference.adapter import read_adapter
    from tensafe.runtime.adapter_artifact import MAX_MEMBERS, adapter_from_files, read_adapter_artifact
    from tensafe.trainer import checkpoint

    good = adapter_tar(config())
    session = {"session.json": b"{}", "rng.safetensors": st_save({"cpu": torch.zeros(4, dtype=torch.uint8)})}
    cases = {
        "over the size cap": (good, 1024, "artifact_id", "TENSAFE_MAX_ARTIFACT_MB"),
        "17 members": (adapter_tar(config(), **session, **{f"n{i}": b"x" for i in range(13)}), 1 << 30,
                       "artifact_id", "more than 16 members"),
        "no weights": (tar_of({"adapter_config.json": json.dumps(config()).encode(), **session}), 1 << 30,
                       "artifact_id", "adapter_model.safetensors"),
        "sparse member": (_header_member("adapter_config.json", json.dumps(config()).encode()) + gnu_sparse_bomb(),
                          1 << 30, "artifact_id", "sparse"),
        "pissa": (adapter_tar(config(init_lora_weights="pissa"), **session), 1 << 30,
                  "adapter_config.init_lora_weights", ""),
        "base weight": (adapter_tar(config(), BAD_WEIGHTS["base_layer_weight"], **session), 1 << 30,
                        "adapter_model", "LoRA factor"),
    }
    readers = {
        "inference": lambda data, cap: read_adapter(data, cap),
        "he": lambda data, cap: he_adapters.layers(read_adapter_artifact(data, cap)),
        # checkpoint.read, then the config and weights rules check_adapter applies (it needs a session).
        "trainer": lambda data, cap: adapter_from_files(checkpoint.read(data, cap), what="checkpoint"),
    }
    for case, (data, cap, field, words) in cases.items():
        for reader_name, reader in readers.items():
            with pytest.raises(InvalidArgument) as err:
                reader(data, cap)
            assert (err.value.field, words in str(err.value)) == (field, True), (case, reader_name, str(err.value))
    # What one accepts, all accept: 16 members (a checkpoint's six and others), a PEFT adapter alone.
    assert MAX_MEMBERS == 16
    for reader in readers.values():
        reader(adapter_tar(config(), **session, **{f"n{i}": b"x" for i in range(12)}), 1 << 30)
    for reader in ("inference", "he"):
        readers[reader](good, len(good))


# -- through a real `tensafe up` ------------------------------------------------------------------------------------
def _tc_config(seed: int = 1, bias: str = "none") -> TrainingConfig:
    return TrainingConfig(model_ref="tiny", batch_size=2, seed=seed,
                          lora_config=LoRAConfig(rank=RANK, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                 bias=bias),
                          optimizer=OptimizerConfig(name="adamw", learning_rate=1e-2))


def _tenant(stack, name: str):
    out = stack.cli("keys", "create", "--tenant", name)
    assert out.returncode == 0, out.stderr
    return stack.client(api_key=out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def attacker(trainer_stack):
    with _tenant(trainer_stack, "mallory") as client:
        yield client


@pytest.fixture(scope="module")
def victim(trainer_stack):
    with _tenant(trainer_stack, "alice") as client:
        yield client


def _fingerprint(client) -> list:
    """The shared base's greedy samples and their log-probabilities, from the inference service."""
    sc = client.create_sampling_client(model_ref="tiny")
    return [(s.token_ids, s.logprobs) for s in
            sc.sample(PROMPTS, max_tokens=12, temperature=0, return_logprobs=True).samples]


def test_refused_adapters_through_the_inference_service(attacker, victim) -> None:
    before = _fingerprint(victim)
    cases = [(adapter_tar(config(**changes)), field) for changes, field in BAD_CONFIGS.values()]
    cases += [(adapter_tar(config(), tensors), "adapter_model") for tensors in BAD_WEIGHTS.values()]
    for data, field in cases:
        artifact = attacker.artifacts.put(data, kind="adapter", name="crafted")
        with pytest.raises(ValidationError) as err:
            attacker.create_sampling_client(artifact_id=artifact.artifact_id)
        assert err.value.field.split("[")[0] == field
    assert _fingerprint(victim) == before  # bit-identical log-probabilities: the base did not change
    good = attacker.artifacts.put(adapter_tar(config()), kind="adapter", name="good")
    sc = attacker.create_sampling_client(artifact_id=good.artifact_id)
    assert sc.sample(PROMPTS[:1], max_tokens=4, temperature=0).samples[0].token_ids
    assert _fingerprint(victim) == before
    sc.unload()
    assert _fingerprint(victim) == before


def _checkpoint_with(client, tc, **replace: bytes) -> str:
    """The tenant's own checkpoint of ``tc`` with members replaced, uploaded as a new artifact."""
    files = read_tar(client.get_artifact(tc.save_state(include_optimizer=False).artifact_id))
    files.update(replace)
    return client.artifacts.put(tar_of(files), kind="checkpoint", name="edited").artifact_id


def test_load_state_cannot_write_the_shared_base_or_another_session(attacker, victim) -> None:
    rows = [[0, 45, 120, 77, 200, 31, 9, 150], [0, 99, 14, 230, 61, 7, 180, 42]]
    with victim.create_training_client(_tc_config(2)) as theirs, attacker.create_training_client(_tc_config(3)) as tc:
        theirs.forward_backward({"input_ids": rows, "attention_mask": [[1] * 8] * 2, "labels": rows})
        theirs.optim_step()

        def probe() -> list:
            return [(s.token_ids, s.logprobs) for s in
                    theirs.sample(PROMPTS, max_tokens=8, temperature=0, return_logprobs=True).samples]

        before = probe()
        own = st_load(read_tar(attacker.get_artifact(tc.save_state().artifact_id))["adapter_model.safetensors"])
        foreign_key = f"base_model.model.model.layers.0.self_attn.q_proj.lora_A.{theirs.session_id}.weight"
        edits = {
            "base weight": ({"adapter_model.safetensors": st_save({**own, BASE_Q: torch.zeros(64, 64)})},
                            "adapter_model"),
            "lm_head": ({"adapter_model.safetensors": st_save({**own, BASE_HEAD: torch.zeros(384, 64)})},
                        "adapter_model"),
            "another session's adapter": (
                {"adapter_model.safetensors": st_save({**own, foreign_key: torch.zeros(RANK, 64)})}, "adapter_model"),
            "pissa": ({"adapter_config.json": json.dumps(config(init_lora_weights="pissa")).encode()},
                      "adapter_config.init_lora_weights"),
            "regex rank_pattern": ({"adapter_config.json": json.dumps(config(rank_pattern={CATASTROPHIC: 4})).encode()},
                                   "adapter_config.rank_pattern"),
            "layer_replication": ({"adapter_config.json": json.dumps(config(layer_replication=[[0, 2]])).encode()},
                                  "adapter_config.layer_replication"),
        }
        for _name, (replace, field) in edits.items():
            artifact_id = _checkpoint_with(attacker, tc, **replace)
            with pytest.raises(ValidationError) as err:
                tc.load_state(artifact_id)
            assert err.value.field.split("[")[0] == field, _name
        assert probe() == before  # the other tenant's session on the same base is untouched
        tc.load_state(_checkpoint_with(attacker, tc))  # its own checkpoint, unedited, still loads


def test_session_target_modules_are_names_not_patterns(attacker) -> None:
    # PEFT matches a list of target_modules by name or suffix (never re): the trainer refuses anything that
    # is not a plain module name before PEFT sees it, and bounds the count and length.
    for modules in ([CATASTROPHIC], ["q_proj.*"], ["a" * 300], [f"m{i}" for i in range(65)]):
        cfg = _tc_config()
        cfg.lora_config.target_modules = modules
        with pytest.raises(ValidationError) as err:
            attacker.create_training_client(cfg)
        assert err.value.field.split("[")[0] == "config.lora_config.target_modules"


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_sparse_tar_bomb_is_refused_without_allocating(trainer_stack, attacker) -> None:
    pid = trainer_stack.process.proc.pid
    config_member = _header_member("adapter_config.json", json.dumps(config()).encode())
    with attacker.create_training_client(_tc_config(4)) as tc:
        tc.sample(PROMPTS[:1], max_tokens=2, temperature=0)  # the base is loaded before the first reading
        before = _hwm_kib(pid)
        answers = []
        for bomb in (gnu_sparse_bomb(), pax_sparse_bomb()):
            data = config_member + bomb
            assert len(data) < 10_000
            artifact_id = attacker.artifacts.put(data, kind="checkpoint", name="bomb").artifact_id
            for load in (lambda a: attacker.create_sampling_client(artifact_id=a), tc.load_state):
                try:
                    load(artifact_id)
                    answers.append("accepted")
                except Exception as exc:  # noqa: BLE001 - checked below, after the memory
                    answers.append(exc)
    grown_mib = (_hwm_kib(pid) - before) / 1024
    assert grown_mib < 256, f"the server's peak memory grew by {grown_mib:.0f} MiB reading 10 KB tars"
    for answer in answers:
        assert isinstance(answer, ValidationError), answer
        assert answer.field == "artifact_id" and "sparse" in str(answer)


def _header_member(name: str, data: bytes) -> bytes:
    """One regular member, without the end-of-archive blocks (to put in front of a crafted member)."""
    raw = tar_of({name: data})
    return raw[:512 + -(-len(data) // 512) * 512]
