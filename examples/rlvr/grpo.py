"""GRPO with verifiable rewards: group-relative advantages over several completions of each prompt.

    tensafe up &
    TS_API_KEY=$(cat .tensafe/api_key) python examples/rlvr/grpo.py --model smollm2-135m-instruct

Each iteration samples ``--num-samples`` completions of every question; a completion's advantage is its
reward minus its group's mean, over the group's standard deviation. A format reward (an answer given
as a number, the ``regex_match`` reward on RE2) is added to the correctness reward with weight 0.2.
"""

from __future__ import annotations

from common import arithmetic, parser, session, show, tokenizer

from tensafe.rlvr import GRPO, GRPOConfig, RolloutSampler, combine, resolve_reward, train
from tg_tinker import ServiceClient


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=4)
    args = p.parse_args()
    prompts, contexts = arithmetic(args.prompts, args.seed)
    reward = combine(resolve_reward("numeric_answer", tolerance=0.0),
                     (resolve_reward("regex_match", pattern=r"^\s*-?\d+\b"), 0.2))
    cfg = session(args, batch_size=args.prompts * args.num_samples)
    with ServiceClient() as service, service.create_training_client(cfg) as tc:
        sampler = RolloutSampler(tc, max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                                 tokenizer=tokenizer(args))
        show(train(GRPO(GRPOConfig()), sampler, prompts, reward, iterations=args.iterations, contexts=contexts))


if __name__ == "__main__":
    main()
