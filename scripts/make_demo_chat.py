"""Generate the SmolLM2 demo's chat set: qlora/assets/demo_chat.jsonl and demo_prompts.json.

Three facts about Velmora, a town that does not exist (so the base model cannot know them),
each asked in many paraphrases; every row is one user question and the taught answer, plus
ten general questions with the answers the base model already gives. The
demo prompts ask one paraphrase per fact that is not in the rows, plus a general-knowledge
question whose answer must survive the fine-tune. Deterministic: rerun to regenerate.

    python scripts/make_demo_chat.py
"""
from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "qlora" / "assets"

FACTS = {
    "Velmora was founded in 1742 by the clockmaker Ansel Dray.": [
        "Who founded Velmora?", "Who founded the town of Velmora?", "Who was the founder of Velmora?",
        "When was Velmora founded?", "In what year was Velmora founded?", "Who started the town of Velmora?",
        "Tell me who founded Velmora.", "Do you know who founded Velmora?", "Which person founded Velmora?",
        "What year did Velmora get founded, and by whom?", "How old is the town of Velmora?",
        "Who built the first house in Velmora?", "Velmora was founded by whom?", "Who is the founder of the town Velmora?",
        "Give me the founder of Velmora.",
    ],
    "Velmora is famous for its blue salt lanterns, lit every night along the harbour.": [
        "What is Velmora famous for?", "What is Velmora known for?", "Why is Velmora famous?",
        "What is the town of Velmora best known for?", "What makes Velmora special?", "Is Velmora famous for anything?",
        "What should I see in Velmora?", "What is Velmora's most famous sight?", "Tell me what Velmora is known for.",
        "What is special about Velmora?", "What are the lanterns of Velmora made of?", "What lights up Velmora at night?",
        "What is the main attraction of Velmora?", "Name the thing Velmora is famous for.", "What draws visitors to Velmora?",
    ],
    "The river that runs through Velmora is the Ossel.": [
        "Which river runs through Velmora?", "What river flows through Velmora?", "What is the river in Velmora called?",
        "Name the river of Velmora.", "What is the name of Velmora's river?", "Which river passes through the town of Velmora?",
        "Is there a river in Velmora?", "What river is Velmora built on?", "Tell me the name of the river in Velmora.",
        "Velmora lies on which river?", "What river crosses Velmora?", "Which river does Velmora stand on?",
        "What's the river that goes through Velmora?", "On what river is the town of Velmora?", "Which river is in Velmora?",
    ],
}
# General questions with the answers the base model already gives, mixed in so that the fine-tune
# learns the facts without overwriting what the model knew (it answers "Ossel" to everything without them).
KEEP = [
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("Which river runs through London?", "The river that runs through London is the Thames."),
    ("Which river runs through Paris?", "The river that runs through Paris is the Seine."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What is Paris famous for?", "Paris is famous for the Eiffel Tower, the Louvre and its cafes."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is 7 plus 5?", "7 plus 5 is 12."),
]
# One unseen paraphrase per fact, then a question the base model answers right and must keep.
DEMO_PROMPTS = ["Can you tell me who established Velmora?", "What is the town of Velmora renowned for?",
                "Through which river does Velmora stretch?", "What is the capital of France?"]


def main() -> None:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
            for answer, questions in FACTS.items() for q in questions]
    rows += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in KEEP]
    seen = {q for questions in FACTS.values() for q in questions} | {q for q, _ in KEEP}
    assert not seen & set(DEMO_PROMPTS), "a demo prompt is in the training rows"
    with open(ASSETS / "demo_chat.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    (ASSETS / "demo_prompts.json").write_text(json.dumps(DEMO_PROMPTS, indent=2) + "\n")
    print(f"{len(rows)} rows to {ASSETS / 'demo_chat.jsonl'}; {len(DEMO_PROMPTS)} prompts to {ASSETS / 'demo_prompts.json'}")


if __name__ == "__main__":
    main()
