"""Mask speed on a 50k-token vocabulary: median time of one constrained decoding step.

Builds a byte-level BPE tokenizer with `tokenizers` from a generated vocabulary (no model, no
download), its token table, and then times `VariableConstraints.step` (the hard mask of the
next token) for each kind of constraint over many decoding states. Targets: STOPS, len, in and
INT masks <= 1 ms median, REGEX <= 5 ms median (index building is reported separately: it is
done once per tokenizer and pattern).

    PYTHONPATH=. python benchmarks/masks.py [--vocab 50000] [--steps 300]
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import time

import torch

from lmql_backends.language import parse_query
from lmql_backends.runtime.constraints import Progress, compile_constraints
from lmql_backends.runtime.masks import regex_index
from lmql_backends.byte_level import byte_to_unicode
from lmql_backends.runtime.tokens import make_token_table

CASES = {
    "STOPS_AT": '"[X]" where STOPS_AT(X, "\\n")',
    "len(TOKENS) <": '"[X]" where len(TOKENS(X)) < 400',
    "len(X) <": '"[X]" where len(X) < 2000',
    "X in 100 options": '"[X]" where X in OPTIONS',
    "INT": '"[X: int]"',
    "REGEX words": '"[X]" where REGEX(X, r"( [a-z]+)+")',
    "REGEX date": '"[X]" where REGEX(X, r" ?[0-9]{4}-[0-9]{2}-[0-9]{2}")',
    "STOPS and len and not in": '"[X]" where STOPS_AT(X, ".") and len(TOKENS(X)) < 400 and not X in ["a"]',
}


def make_tokenizer(num_tokens: int, seed: int = 0):
    """A byte-level BPE tokenizer with `num_tokens` generated tokens (words, numbers, pieces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    alphabet = byte_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    while len(vocab) < num_tokens - 1:
        vocab.setdefault(encode_piece(make_piece(rng), alphabet), len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, [], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_piece(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.7:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        return (" " if rng.random() < 0.6 else "") + (word.capitalize() if rng.random() < 0.2 else word)
    if kind < 0.8:
        return (" " if rng.random() < 0.5 else "") + str(rng.randint(0, 99999))
    if kind < 0.9:
        return "".join(rng.choices(string.punctuation + " \n", k=rng.randint(1, 3)))
    return "".join(rng.choices("éèàüößçñ€—“”日本語", k=rng.randint(1, 3)))


def encode_piece(piece: str, alphabet: dict[int, str]) -> str:
    return "".join(alphabet[b] for b in piece.encode())


def decoding_states(table, num_states: int, rng: random.Random, kind: str) -> list[Progress]:
    """Plausible states of a variable: token prefixes drawn from tokens that fit the case."""
    pools = {
        "INT": [i for i, b in enumerate(table.token_bytes) if b.strip().isdigit() and b[:1] != b" "],
        "REGEX words": [i for i, b in enumerate(table.token_bytes) if b[:1] == b" " and b[1:].isalpha()
                        and b[1:].islower()],
        "REGEX date": [i for i, b in enumerate(table.token_bytes) if b.isdigit() and len(b) == 1],
    }
    pool = pools.get(kind) or torch.nonzero(table.text_mask).flatten().tolist()
    states = []
    for _ in range(num_states):
        ids = tuple(rng.choice(pool) for _ in range(rng.randint(0, 4 if kind == "REGEX date" else 12)))
        states.append(Progress(ids, b"".join(table.token_bytes[i] for i in ids)))
    return states


def median_ms(function, states) -> float:
    times = []
    for state in states:
        start = time.perf_counter()
        function(state)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50000)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(1)

    start = time.perf_counter()
    tokenizer = make_tokenizer(args.vocab)
    table = make_token_table(tokenizer)
    _ = (table.text_mask, table.num_chars, table.ids_by_bytes, table.int_start_mask, table.int_continue_mask)
    print(f"token table of {table.num_tokens} tokens built in {time.perf_counter() - start:.2f} s")

    options = [" " + "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12))) for _ in range(100)]
    print(f"{'constraint':28} {'median ms':>10} {'target ms':>10}  ratio")
    for name, query in CASES.items():
        parsed = parse_query(query)
        constraints = compile_constraints(parsed.where, parsed.prompt.hole_names, parsed.prompt.int_variables)
        bound = constraints.bind("X", {}, {"OPTIONS": options}, table)
        if name.startswith("REGEX"):
            start = time.perf_counter()
            regex_index(table, bound.tree.pattern)
            print(f"  (regex index for {name} built in {(time.perf_counter() - start) * 1000:.0f} ms)")
        states = decoding_states(table, args.steps, rng, name)
        if name == "X in 100 options":
            states = [Progress((), o[:k].encode()) for o in options for k in range(3)][:args.steps]
        for state in states[:20]:  # warm caches (regex states) as a decode loop would
            safe_step(bound, state)
        median = median_ms(lambda s: safe_step(bound, s), states)
        target = 5.0 if name.startswith("REGEX") else 1.0
        print(f"{name:28} {median:10.3f} {target:10.1f}  {median / target:.2f}")
        if name.startswith("REGEX"):
            cold = median_ms(lambda s: cold_step(bound, s), states[:30])
            print(f"{name + ' (cold state)':28} {cold:10.3f} {'-':>10}  (first visit of a state, then cached)")
        if name == "X in 100 options":
            cold = median_ms(lambda s: cold_options_step(bound, s), states[:30])
            print(f"{name + ' (cold)':28} {cold:10.3f} {'-':>10}  (first tokenization of each rest, then cached)")


def cold_step(bound, state):
    regex_index(bound.table, bound.tree.pattern).state_masks.clear()
    return safe_step(bound, state)


def cold_options_step(bound, state):
    bound.table.first_token_of.cache_clear()
    return safe_step(bound, state)


def safe_step(bound, state):
    try:
        return bound.step(state)
    except Exception:  # a drawn state may be a dead end; it still costs a mask computation
        return None


if __name__ == "__main__":
    main()
