"""Host cost of one structured-output token mask: `TokenIndex.allowed` for a byte DFA state, on a vocabulary
of Qwen2.5's size (151,643 tokens, logits 151,936 wide). No model, no GPU.

Two vocabularies: `random` (default, instant) samples byte strings with a byte-level BPE's length profile
(mean ~6.5 bytes, mostly printable ASCII with some UTF-8 pieces, a few runs of 64-128 bytes); `bpe` trains
a byte-level BPE of that size on the Python standard library's source (about a minute and a half) and maps
it with `token_bytes`. States timed: inside a JSON string (`"[^"]*"`: almost every token lives for many
bytes), the start of a JSON string (only tokens starting with '"'), and an integer (`[0-9]+`).

    PYTHONPATH=. python scripts/structured_mask_bench.py [--vocab random|bpe --calls 50]
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from nanovllm.structured.vocab import TokenIndex, token_bytes

NUM_TOKENS, VOCAB_SIZE = 151_643, 151_936  # Qwen2.5's tokenizer and logits


def random_vocab(seed: int = 0) -> list[bytes | None]:
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.geometric(1 / 6.5, NUM_TOKENS), 40)
    lengths[rng.choice(NUM_TOKENS, 30, replace=False)] = rng.integers(64, 129, 30)  # runs of spaces, '=', ...
    printable = np.frombuffer(bytes(range(0x20, 0x7F)), dtype=np.uint8)
    tokens: list[bytes | None] = []
    for n in lengths:
        if rng.random() < 0.1:  # a piece of UTF-8 text (CJK, accents, emoji), whole characters or not
            tokens.append(bytes(rng.integers(0x80, 0x100, n, dtype=np.uint8)))
        else:
            tokens.append(bytes(rng.choice(printable, n)))
    tokens[:3] = [None] * 3  # special tokens
    return tokens


def bpe_vocab() -> list[bytes | None]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def corpus():
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            yield path.read_text(errors="replace")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_TOKENS,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    t0 = time.perf_counter()
    tokens = token_bytes(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>"))
    print(f"token_bytes: {(time.perf_counter() - t0) * 1e3:.0f} ms for {len(tokens)} tokens")
    return tokens


def dfa(num_states: int, edges: dict[int, dict[bytes, int]]) -> SimpleNamespace:
    transitions = np.zeros((num_states, 256), dtype=np.int32)
    for state, moves in edges.items():
        for byte_set, target in moves.items():
            transitions[state, list(byte_set)] = target
    return SimpleNamespace(transitions=transitions, accepting=np.arange(num_states) == num_states - 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", choices=["random", "bpe"], default="random")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    tokens = random_vocab() if args.vocab == "random" else bpe_vocab()
    lengths = [len(b) for b in tokens if b]
    print(
        f"{args.vocab} vocabulary: {len(lengths)} tokens with bytes, "
        f"mean {statistics.mean(lengths):.2f} bytes, max {max(lengths)}, "
        f"{sum(n > 32 for n in lengths)} over 32"
    )
    t0 = time.perf_counter()
    index = TokenIndex(tokens, VOCAB_SIZE)
    print(f"TokenIndex: {(time.perf_counter() - t0) * 1e3:.0f} ms to build")

    not_quote = bytes(b for b in range(256) if b != ord('"'))
    digits = bytes(range(ord("0"), ord("9") + 1))
    json_string = dfa(4, {1: {b'"': 2}, 2: {not_quote: 2, b'"': 3}})  # "[^"]*"
    integer = dfa(3, {1: {digits: 2}, 2: {digits: 2}})  # [0-9]+
    cases = [
        ("inside a JSON string", json_string, 2),
        ("start of a JSON string", json_string, 1),
        ("inside an integer", integer, 2),
    ]
    for name, automaton, state in cases:
        index.allowed(automaton, state)  # warm-up
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            mask = index.allowed(automaton, state)
            times.append(time.perf_counter() - t0)
        print(
            f"{name:>24}: {int(mask.sum()):>7} allowed, "
            f"allowed() median {statistics.median(times) * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
