"""The base model's ``generation_config`` processors the hf backend applies to every row's choice
(repetition penalty, no repeated n-gram), and the ones it does not (logged when the base loads)."""

from __future__ import annotations

import logging

from transformers.generation.logits_process import (
    LogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

log = logging.getLogger("tensafe.inference.hf")

# generation_config fields whose processors generate() would add and this loop does not (docs/inference.md):
# a base that sets one is logged when it loads. Each maps to the value that means "off".
UNAPPLIED: dict[str, object] = {
    "sequence_bias": None, "bad_words_ids": None, "min_length": 0, "min_new_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "exponential_decay_length_penalty": None, "remove_invalid_values": False,
    "renormalize_logits": False, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
    "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None,
}


def config_processors(generation_config: object | None) -> list[LogitsProcessor]:
    """The processors ``generate()`` builds from a base model's ``generation_config`` that every row's choice
    applies too, in generate's order: repetition penalty (over the prompt and the tokens so far), then no
    repeated n-gram. Fields for other processors are logged, not applied."""
    if generation_config is None:
        return []
    out: list[LogitsProcessor] = []
    penalty = getattr(generation_config, "repetition_penalty", None)
    if penalty is not None and penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(float(penalty)))
    ngram = getattr(generation_config, "no_repeat_ngram_size", None)
    if ngram is not None and ngram > 0:
        out.append(NoRepeatNGramLogitsProcessor(int(ngram)))
    ignored = sorted(name for name, off in UNAPPLIED.items()
                     if getattr(generation_config, name, off) not in (off, None))
    if ignored:
        log.warning("the base model's generation_config sets %s: the hf backend does not apply %s",
                    ", ".join(f"{n}={getattr(generation_config, n)!r}" for n in ignored),
                    "it" if len(ignored) == 1 else "them")
    return out
