"""PPO (no value function) with verifiable rewards and a KL penalty to the base model.

    tensafe up &
    TS_API_KEY=$(cat .tensafe/api_key) python examples/rlvr/ppo.py --model smollm2-135m-instruct

The reference for the KL penalty is a second session on the same model that never trains: its LoRA
adapter starts at zero, so it computes the base model's log-probabilities. Each iteration makes
``--epochs`` passes over the rollout batch in ``--minibatches`` mini-batches, clipping the ratio to the
sampling policy at 1 +- ``--clip``.
"""

from __future__ import annotations

from common import arithmetic, parser, session, show, tokenizer

from tensafe.rlvr import PPO, PPOConfig, RolloutSampler, resolve_reward, train
from tg_tinker import ServiceClient


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--kl-coef", type=float, default=0.05)
    args = p.parse_args()
    prompts, contexts = arithmetic(args.prompts, args.seed)
    reward = resolve_reward("numeric_answer", tolerance=0.0)
    cfg = session(args, batch_size=args.prompts)
    with ServiceClient() as service, service.create_training_client(cfg) as tc, \
            service.create_training_client(cfg) as reference:
        algo = PPO(PPOConfig(clip_epsilon=args.clip, ppo_epochs=args.epochs, num_minibatches=args.minibatches,
                             kl_coef=args.kl_coef, seed=args.seed), reference=reference)
        sampler = RolloutSampler(tc, max_new_tokens=args.max_new_tokens, tokenizer=tokenizer(args))
        show(train(algo, sampler, prompts, reward, iterations=args.iterations, contexts=contexts))


if __name__ == "__main__":
    main()
