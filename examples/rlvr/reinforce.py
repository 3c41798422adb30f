"""REINFORCE with verifiable rewards, through a running TenSafe stack.

    tensafe up &
    TS_API_KEY=$(cat .tensafe/api_key) python examples/rlvr/reinforce.py --model smollm2-135m-instruct

Each iteration samples a completion of every question with the session's current weights, rewards the
ones whose final number is right, and takes one policy-gradient step (baseline: running mean reward,
advantages normalised, a small entropy bonus). With ``--dp`` the session is differentially private: each
round is a Poisson sample of the questions, advantages use a fixed baseline (a trajectory's advantage may
depend on its own reward only), and the run ends when the budget is spent.
"""

from __future__ import annotations

from common import arithmetic, parser, session, show, tokenizer

from tensafe.rlvr import REINFORCE, REINFORCEConfig, RolloutSampler, resolve_reward, train
from tg_tinker import DPConfig, ServiceClient


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dp", action="store_true", help="train with DP-SGD")
    p.add_argument("--target-epsilon", type=float, default=4.0, help="with --dp")
    args = p.parse_args()
    prompts, contexts = arithmetic(args.prompts, args.seed)
    reward = resolve_reward("numeric_answer", tolerance=0.0)
    if args.dp:
        cfg = session(args, batch_size=max(1, args.prompts // 4), dp_config=DPConfig(
            enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=args.target_epsilon,
            dataset_size=args.prompts))
        algo = REINFORCE(REINFORCEConfig(baseline="constant", baseline_value=0.1, normalize_advantages=False))
    else:
        cfg = session(args, batch_size=args.prompts)
        algo = REINFORCE(REINFORCEConfig(use_baseline=True, normalize_advantages=True, entropy_coef=0.01))
    with ServiceClient() as service, service.create_training_client(cfg) as tc:
        sampler = RolloutSampler(tc, max_new_tokens=args.max_new_tokens, tokenizer=tokenizer(args))
        log = train(algo, sampler, prompts, reward, iterations=args.iterations, contexts=contexts)
        show(log)
        if log.stopped == "dp_budget_exceeded":
            print(f"Budget exhausted: {log.error}")
            tc.save_state(metadata={"reason": "dp_budget_exceeded"})
        if args.dp and log.history:
            print(f"privacy: epsilon {log.history[-1].epsilon:.3f} spent")


if __name__ == "__main__":
    main()
