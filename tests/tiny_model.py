"""A tiny Llama-architecture model with its own BPE tokenizer, for tests that load the real way.

``build_tiny_model(dir)`` trains a byte-level BPE tokenizer on the inline corpus below, builds a
2-layer LlamaForCausalLM (hidden 64) from a config with a fixed seed, and writes both with
``save_pretrained`` (safetensors), so ``from_pretrained(dir)`` works exactly as for a real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
VOCAB_SIZE = 384

CORPUS = [
    "Once upon a time there was a small robot who loved to read books.",
    "The quick brown fox jumps over the lazy dog.",
    "A privacy-first platform keeps training data encrypted at rest.",
    "The clinic opens at eight in the morning and closes at six in the evening.",
    "Refill requests are processed within two business days.",
    "Lab results are usually ready within three days.",
    "Please bring your insurance card to every appointment.",
    "The model learns a low-rank adapter on top of frozen weights.",
    "Gradient descent takes small steps downhill on the loss surface.",
    "She opened the window and the cool air filled the room.",
    "He wrote a short letter to his grandmother every Sunday.",
    "The train to the city leaves every twenty minutes.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The cat slept in a patch of warm sunlight on the floor.",
    "We measured the memory used by each training session.",
    "Hello, world! How are you today?",
    "What is the capital of France? The capital of France is Paris.",
    "Numbers like 1, 2, 3, 42 and 2024 appear in text too.",
    "The library is quiet in the afternoon and busy at night.",
    "Tokens are pieces of words that the model reads one at a time.",
    "A good test is small, fast and checks one thing.",
    "The garden had roses, tulips and a tall old oak tree.",
    "Please cancel appointments at least twenty-four hours in advance.",
    "Billing questions can be answered by the front desk team.",
    "Every step of the optimizer updates the adapter weights.",
    "The sun rose over the hills and the birds began to sing.",
    "Encryption keys never leave the vault service.",
    "The audit ledger records every operation in order.",
    "Children played football in the park after school.",
    "A cup of tea and a good book make a fine evening.",
    "The river flowed slowly past the old stone bridge.",
    "Learning rate, batch size and rank are the main settings.",
    "I think, therefore I am.",
    "To be or not to be, that is the question.",
    "The weather today is sunny with a light breeze.",
    "Our team ships small changes and tests them carefully.",
]


def _train_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=256
    )


def build_tiny_model(dir: Path, seed: int = 0) -> Path:
    """Write a tiny LlamaForCausalLM and its tokenizer to ``dir`` (created if needed); return ``dir``."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Wider than the usual 0.02: with a frozen output head of std 0.02 over 64 dimensions the logits can
        # barely move, so no adapter could fit anything; at 0.2 a LoRA adapter memorises a batch in tens of steps.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return dir
