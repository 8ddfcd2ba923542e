"""Generate the demo's sample data (deterministic): 20 simple facts (10 capitals, 10 about numbers, colours, planets
and nature) asked and answered in chat form, few enough for the CPU demo's tiny model to learn them by heart.

    python assets/data/make_sample_data.py            # writes the five files below
    python assets/data/make_sample_data.py --out DIR

Every fact has one answer, always worded the same; a capital is asked in one of four wordings.

sample_chat.jsonl              400 {"text": "<human>: ...\n<bot>: ..."} records, one exchange each
sample_messages.jsonl          100 {"messages": [{"role": ..., "content": ...}, ...]} records of 1-3 exchanges (some
                                   with a system message)
sample_eval.jsonl               50 text records: the same facts in another order (different seed)
sample_preferences.jsonl        40 preference pairs in TRL's conversational format (--objective dpo / simpo / orpo):
                                   each fact twice, chosen = its answer, rejected = a plausible wrong one
sample_preferences_eval.jsonl    8 such pairs for evaluation (another seed)

Why the text records hold one exchange: the demo trains with --loss-on-bot-only, which trains a text record's bot
turn up to the next `<human>:`, so an answer followed by another exchange would teach the newline before it but never
the `<human>:` that ends a reply in tools/chat.py. A record's last answer is followed by the trained EOS, where chat
stops. Messages records train each answer's content alone, and the EOS after the last, so they can hold several.
"""

from __future__ import annotations

import argparse
import json
import os
import random

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
]

CAPITAL_QUESTIONS = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Do you know the capital of {c}?",
    "Name the capital city of {c}.",
]

FACTS = [
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("At what temperature does water boil at sea level?", "At sea level water boils at 100 degrees Celsius."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("How many continents are there?", "There are seven continents."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
]

# A plausible wrong answer per fact: what a preference pair rejects.
WRONG_CAPITALS = {
    "France": "Lyon",
    "Germany": "Munich",
    "Italy": "Milan",
    "Spain": "Barcelona",
    "Portugal": "Porto",
    "Japan": "Osaka",
    "China": "Shanghai",
    "India": "Mumbai",
    "Canada": "Toronto",
    "Mexico": "Guadalajara",
}

WRONG_FACTS = {
    "How many days are in a week?": "There are five days in a week.",
    "How many legs does a spider have?": "A spider has six legs.",
    "What color do you get by mixing blue and yellow?": "Mixing blue and yellow gives purple.",
    "Which planet is closest to the Sun?": "Venus is the planet closest to the Sun.",
    "What is the largest planet in our solar system?": "Saturn is the largest planet in our solar system.",
    "What is the opposite of hot?": "The opposite of hot is warm.",
    "At what temperature does water boil at sea level?": "At sea level water boils at 50 degrees Celsius.",
    "What do bees make?": "Bees make silk and paper.",
    "How many continents are there?": "There are nine continents.",
    "How many sides does a hexagon have?": "A hexagon has eight sides.",
}

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a friendly tutor. Answer briefly and clearly.",
    "You are a concise assistant that answers factual questions.",
]


def capital(rng):
    country, city = rng.choice(CAPITALS)
    return rng.choice(CAPITAL_QUESTIONS).format(c=country), f"The capital of {country} is {city}."


def fact(rng):
    return rng.choice(FACTS)


def exchange(rng):
    return rng.choice([capital, fact])(rng)


def text_record(rng):
    q, a = exchange(rng)
    return {"text": f"<human>: {q}\n<bot>: {a}"}


def messages_record(rng):
    msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.4 else []
    for q, a in (exchange(rng) for _ in range(rng.randint(1, 3))):
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def preference_records(rng, rounds):
    """Each of the 20 facts `rounds` times, shuffled: {"prompt": [user], "chosen": [right], "rejected": [wrong]}."""
    items = []
    for _ in range(rounds):
        for country, city in CAPITALS:
            q = rng.choice(CAPITAL_QUESTIONS).format(c=country)
            right = f"The capital of {country} is {city}."
            items.append((q, right, f"The capital of {country} is {WRONG_CAPITALS[country]}."))
        items += [(q, a, WRONG_FACTS[q]) for q, a in FACTS]
    rng.shuffle(items)
    return [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": right}],
            "rejected": [{"role": "assistant", "content": wrong}],
        }
        for q, right, wrong in items
    ]


def write(path, records):
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    rng = random.Random(20240601)
    write(os.path.join(args.out, "sample_chat.jsonl"), [text_record(rng) for _ in range(400)])
    write(os.path.join(args.out, "sample_messages.jsonl"), [messages_record(rng) for _ in range(100)])
    rng = random.Random(7)
    write(os.path.join(args.out, "sample_eval.jsonl"), [text_record(rng) for _ in range(50)])
    write(os.path.join(args.out, "sample_preferences.jsonl"), preference_records(random.Random(11), 2))
    write(os.path.join(args.out, "sample_preferences_eval.jsonl"), preference_records(random.Random(12), 1)[:8])


if __name__ == "__main__":
    main()
