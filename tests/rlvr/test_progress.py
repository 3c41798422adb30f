"""The progress line of long runs shows the reward and the KL (tqdm's bar, or a plain line without tqdm)."""

from __future__ import annotations

import builtins
import io

from tensafe.rlvr import Progress, UpdateResult


def result(reward: float, kl: float, eps: float | None = None) -> UpdateResult:
    return UpdateResult(mean_reward=reward, std_reward=0.0, loss=0.0, kl=kl, approx_kl=kl, clip_fraction=0.0,
                        entropy=1.0, grad_norm=0.1, mean_advantage_abs=0.5, num_trajectories=4, num_tokens=8,
                        optimizer_steps=1, reward_errors=0, step=1, epsilon=eps)


def test_tqdm_bar_shows_reward_and_kl() -> None:
    out = io.StringIO()
    bar = Progress(2, stream=out)
    bar.update(result(0.25, 0.0123))
    bar.update(result(0.75, 0.0456, eps=1.5))
    bar.close()
    text = out.getvalue()
    assert "2/2" in text and "reward=0.750" in text and "kl=0.0456" in text and "eps=1.500" in text


def test_plain_line_without_tqdm(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("no tqdm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    out = io.StringIO()
    bar = Progress(3, stream=out, desc="ppo")
    bar.update(result(0.5, 0.001))
    assert out.getvalue() == "[ppo] 1/3 reward=0.500 kl=0.0010\n"
    quiet = io.StringIO()
    Progress(3, enabled=False, stream=quiet).update(result(0.5, 0.001))
    assert quiet.getvalue() == ""
