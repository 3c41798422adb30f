"""One `tensafe up` serving the RL tiny model (rl_model.py: fine-tuned so that it has something to learn from)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Stack, start_stack
from rlvr.rl_model import build_rl_model

MODEL = "rl-tiny"


@pytest.fixture(scope="session")
def rl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_rl_model(tmp_path_factory.mktemp("rl-models") / MODEL)


@pytest.fixture(scope="session")
def rl_stack(tmp_path_factory: pytest.TempPathFactory, rl_model: Path) -> Iterator[Stack]:
    # One torch thread: the tiny model's ops are too small to gain from more, and on a shared machine the
    # default (one per core) oversubscribes the cores several-fold.
    s = start_stack(tmp_path_factory.mktemp("rl-stack"), {"TENSAFE_MODEL_DIR": str(rl_model.parent),
                                                          "OMP_NUM_THREADS": "1"})
    yield s
    assert s.process.stop() == 0, s.process.output()


@pytest.fixture
def service(rl_stack: Stack):
    with rl_stack.client(retry_count=2) as client:
        yield client


@pytest.fixture(scope="session")
def tokenizer(rl_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(rl_model))
