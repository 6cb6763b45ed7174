"""Generate the shipped preference set: qlora/assets/preferences.jsonl.

    .venv/bin/python scripts/make_preferences.py

Rows {"prompt": [{"role": "user", "content": question}], "chosen": answer, "rejected": worse}
for `qlora train --method dpo|orpo` (messages-style prompts: the chat template renders them).
The chosen answer is a plain correct sentence; the rejected one says the same thing shouting
(upper case, "!!!") or answers wrongly in a plain sentence, alternating, so that a preference
model must learn both "calm" and "correct". Questions come from small fact tables (capitals,
sums, opposites, colours, animal sounds); the order is shuffled with a fixed seed, so the
file is byte-identical on every run. tests/model/test_smollm2.py trains SmolLM2 on the first
rows and checks the preference accuracy on the last ones (held out).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "qlora" / "assets"
SEED = 0

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"),
            ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago")]
OPPOSITES = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("early", "late"),
             ("open", "closed"), ("light", "dark"), ("happy", "sad"), ("full", "empty"), ("young", "old")]
COLOURS = [("grass", "green"), ("snow", "white"), ("the sky on a clear day", "blue"), ("a ripe banana", "yellow"),
           ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("chocolate", "brown")]
SOUNDS = [("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("duck", "quacks"), ("sheep", "bleats"),
          ("lion", "roars"), ("owl", "hoots"), ("horse", "neighs")]


def facts() -> list[tuple[str, str, str]]:
    """(question, correct answer, wrong answer) triples."""
    rng = random.Random(SEED)
    out = []
    for i, (country, city) in enumerate(CAPITALS):
        wrong = CAPITALS[(i + 1 + rng.randrange(len(CAPITALS) - 1)) % len(CAPITALS)][1]
        out.append((f"What is the capital of {country}?", f"The capital of {country} is {city}.",
                    f"The capital of {country} is {wrong}."))
    for a in range(2, 9, 2):
        for b in (3, 5, 7):
            out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + 1}."))
    for word, opposite in OPPOSITES:
        out.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.",
                    f"The opposite of {word} is {word}."))
    for i, (thing, colour) in enumerate(COLOURS):
        wrong = COLOURS[(i + 3) % len(COLOURS)][1]
        out.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}.",
                    f"{thing[0].upper() + thing[1:]} is {wrong}."))
    for i, (animal, sound) in enumerate(SOUNDS):
        wrong = SOUNDS[(i + 2) % len(SOUNDS)][1]
        out.append((f"What sound does a {animal} make?", f"A {animal} {sound}.", f"A {animal} {wrong}."))
    return out


def rows() -> list[dict]:
    triples = facts()
    random.Random(SEED).shuffle(triples)
    out = []
    for i, (question, right, wrong) in enumerate(triples):
        rejected = right.upper().rstrip(".") + "!!!" if i % 2 == 0 else wrong
        out.append({"prompt": [{"role": "user", "content": question}], "chosen": right, "rejected": rejected})
    return out


def main() -> None:
    data = rows()
    (ASSETS / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"wrote {len(data)} rows to {ASSETS / 'preferences.jsonl'}")


if __name__ == "__main__":
    main()
