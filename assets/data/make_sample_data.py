"""Generate the demo's sample data (deterministic): templated OIG-style Q&A about arithmetic, capitals, units,
spelling and simple facts.

    python assets/data/make_sample_data.py            # writes sample_chat.jsonl, sample_messages.jsonl, sample_eval.jsonl
    python assets/data/make_sample_data.py --out DIR

sample_chat.jsonl      800 {"text": "<human>: ...\\n<bot>: ..."} records (1-4 turns each)
sample_messages.jsonl  100 {"messages": [{"role": ..., "content": ...}, ...]} records (some with a system message)
sample_eval.jsonl       50 text records from the same distribution, different seed
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
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Australia", "Canberra"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Russia", "Moscow"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
    ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"),
    ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"),
    ("Cuba", "Havana"),
    ("Colombia", "Bogota"),
    ("Indonesia", "Jakarta"),
    ("New Zealand", "Wellington"),
]

WORDS = [
    "necessary",
    "rhythm",
    "separate",
    "definitely",
    "calendar",
    "tomorrow",
    "library",
    "February",
    "government",
    "beautiful",
    "restaurant",
    "environment",
    "knowledge",
    "Wednesday",
    "occasion",
    "embarrass",
    "accommodate",
    "believe",
    "receive",
    "science",
    "island",
    "friend",
    "weird",
    "business",
    "language",
    "neighbor",
    "chocolate",
    "vegetable",
    "temperature",
    "question",
]

FACTS = [
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of early?", "The opposite of early is late."),
    ("At what temperature does water boil at sea level?", "At sea level water boils at 100 degrees Celsius."),
    ("How many months have 31 days?", "Seven months have 31 days."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("How many continents are there?", "There are seven continents."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("What animal is known as the king of the jungle?", "The lion is often called the king of the jungle."),
    ("What is the tallest animal?", "The giraffe is the tallest animal."),
]

UNITS = [
    ("kilometers", "miles", 0.621371, "{a} kilometers is about {b} miles."),
    ("miles", "kilometers", 1.609344, "{a} miles is about {b} kilometers."),
    ("kilograms", "pounds", 2.204623, "{a} kilograms is about {b} pounds."),
    ("meters", "feet", 3.28084, "{a} meters is about {b} feet."),
    ("liters", "cups", 4.226753, "{a} liters is about {b} cups."),
    ("hours", "minutes", 60, "{a} hours is {b} minutes."),
    ("minutes", "seconds", 60, "{a} minutes is {b} seconds."),
]

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a friendly tutor. Answer briefly and clearly.",
    "You are a concise assistant that answers factual questions.",
]


def arithmetic(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["plus", "minus", "times"])
    val = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    q = rng.choice(
        [
            "What is {a} {op} {b}?",
            "Can you tell me what {a} {op} {b} is?",
            "Compute {a} {op} {b}.",
            "Quick question: {a} {op} {b}?",
        ]
    ).format(a=a, op=op, b=b)
    ans = rng.choice(
        ["{a} {op} {b} is {v}.", "The answer is {v}.", "{a} {op} {b} equals {v}.", "That would be {v}."]
    ).format(a=a, op=op, b=b, v=val)
    return q, ans


def capital(rng):
    country, city = rng.choice(CAPITALS)
    q = rng.choice(
        [
            "What is the capital of {c}?",
            "Which city is the capital of {c}?",
            "Do you know the capital of {c}?",
            "Name the capital city of {c}.",
        ]
    ).format(c=country)
    ans = rng.choice(["The capital of {c} is {x}.", "{x} is the capital of {c}.", "It is {x}."]).format(
        c=country, x=city
    )
    return q, ans


def units(rng):
    src, dst, factor, tmpl = rng.choice(UNITS)
    a = rng.randint(1, 50)
    b = a * factor
    b = f"{b:.0f}" if float(b).is_integer() else f"{b:.1f}"
    q = rng.choice(["How many {d} are in {a} {s}?", "Convert {a} {s} to {d}.", "What is {a} {s} in {d}?"]).format(
        a=a, s=src, d=dst
    )
    return q, tmpl.format(a=a, b=b)


def spelling(rng):
    w = rng.choice(WORDS)
    q = rng.choice(
        ["How do you spell {w}?", "Can you spell the word {w} for me?", "Spell {w} letter by letter."]
    ).format(w=w)
    ans = rng.choice(["{w} is spelled {s}.", "Sure: {s}.", "It is spelled {s}."]).format(w=w, s="-".join(w))
    return q, ans


def fact(rng):
    return rng.choice(FACTS)


KINDS = [arithmetic, capital, units, spelling, fact]


def turns(rng, lo=1, hi=3):
    return [rng.choice(KINDS)(rng) for _ in range(rng.randint(lo, hi))]


def text_record(rng):
    return {"text": "\n".join(f"<human>: {q}\n<bot>: {a}" for q, a in turns(rng, 1, 4))}


def messages_record(rng):
    msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.4 else []
    for q, a in turns(rng):
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def write(path, records):
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    rng = random.Random(20240601)
    write(os.path.join(args.out, "sample_chat.jsonl"), [text_record(rng) for _ in range(800)])
    write(os.path.join(args.out, "sample_messages.jsonl"), [messages_record(rng) for _ in range(100)])
    rng = random.Random(7)
    write(os.path.join(args.out, "sample_eval.jsonl"), [text_record(rng) for _ in range(50)])


if __name__ == "__main__":
    main()
