"""Regenerate ``corpus.txt``, the embedded default text: ``python make_corpus.py``.

A small synthetic English-like text with structure a tiny LM can learn in a minute:
agreement in simple sentences, counting, sums, and copying. Deterministic (seed 0).
"""

import random
from pathlib import Path

NOUNS = ["fox", "dog", "cat", "bird", "horse", "child", "farmer", "river", "tree", "king", "queen", "ship"]
ADJECTIVES = ["red", "quick", "lazy", "old", "young", "small", "tall", "quiet", "bright", "dark"]
VERBS = ["sees", "follows", "likes", "finds", "helps", "watches", "calls", "carries"]
PLACES = ["the hill", "the town", "the forest", "the sea", "the field", "the castle"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return (f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                f"the {rng.choice(NOUNS)} near {rng.choice(PLACES)}.")
    if kind == 1:
        start = rng.randrange(0, 6)
        return "count: " + " ".join(NUMBERS[start:start + rng.randrange(3, 6)]) + "."
    if kind == 2:
        a, b = rng.randrange(0, 50), rng.randrange(0, 50)
        return f"{a} + {b} = {a + b}."
    if kind == 3:
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randrange(3, 7)))
        return f"copy {word} as {word}."
    noun = rng.choice(NOUNS)
    return f"a {noun} is a {noun}, and the {noun} goes to {rng.choice(PLACES)}."


def main(chars: int = 300_000, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines, total = [], 0
    while total < chars:
        line = " ".join(sentence(rng) for _ in range(rng.randrange(2, 5)))
        lines.append(line)
        total += len(line) + 1
    Path(__file__).with_name("corpus.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
