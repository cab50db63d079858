#!/usr/bin/env python3
"""Writes the prompt sets that `tandem bench serve` ships with, deterministically
(seeded, standard library only, no downloads):

- chat.jsonl: short chat-like requests (questions, rewrites, small tasks),
  prompts of ~10-90 tokens, wanted answers of 24-256 tokens (log-normal);
- docs.jsonl: long-document requests (a report, minutes or an article of
  ~400-1900 tokens followed by an instruction), answers of 32-160 tokens.

Each line: {"kind": "chat"|"doc", "prompt": TEXT, "max_tokens": N}.

    python3 bench/data/make_dataset.py        # rewrites bench/data/*.jsonl
"""
import json
import math
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "compound interest",
    "the water cycle", "machine learning", "the Roman Empire", "vaccines",
    "plate tectonics", "the stock market", "climate change", "the immune system",
    "quantum computing", "the printing press", "renewable energy", "sleep",
    "coffee", "the Silk Road", "volcanoes", "bees", "the internet", "jazz",
    "chess openings", "sourdough bread", "electric cars", "the Moon landing",
    "inflation", "recycling", "the human heart", "DNA", "the Great Wall of China",
    "tides", "rainbows", "honey", "glaciers", "public libraries", "bicycles",
    "the Olympic Games", "solar panels", "earthquakes",
]
AUDIENCES = ["a ten-year-old", "a busy manager", "a first-year student", "my grandmother",
             "a software engineer", "a tourist"]
QUESTIONS = [
    "What is {t}?",
    "Explain {t} to {a} in a few sentences.",
    "Give me three interesting facts about {t}.",
    "Why does {t} matter today?",
    "Write a short poem about {t}.",
    "What are the most common misconceptions about {t}?",
    "Summarise the history of {t} in one paragraph.",
    "How would you teach {t} to {a}? Give a short lesson plan.",
    "List the pros and cons of {t} as a bullet list.",
    "Compare {t} and {u}. Which one is easier to explain to {a}?",
    "I am writing an essay on {t}. Suggest an outline with five sections.",
    "Write a friendly email to a colleague inviting them to a talk about {t}.",
    "Translate into simple English: '{t} is a phenomenon of considerable complexity.'",
    "Tell me a short story in which {t} plays a surprising role.",
    "What questions should I ask an expert on {t}?",
]
TASKS = [
    "Rewrite this sentence to sound more polite: 'Send me the report now.'",
    "Fix the grammar: 'Me and him goes to the market every days.'",
    "Write a haiku about autumn rain.",
    "Give me a recipe for a quick vegetable soup.",
    "What is 17 times 23? Show your steps.",
    "Suggest five names for a small bakery by the sea.",
    "Write a Python function that reverses a string, with a docstring.",
    "How do I politely decline a meeting invitation?",
    "Plan a three-day trip to a mountain village on a small budget.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a limerick about a cat who loves to code.",
    "What should I pack for a week-long hiking trip?",
]

NAMES = ["Alice", "Bruno", "Chen", "Dana", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kemal", "Lena", "Mateo", "Nora", "Omar", "Priya"]
TEAMS = ["platform", "billing", "search", "mobile", "data", "support", "security", "design"]
THINGS = ["the release schedule", "the budget for next quarter", "customer feedback",
          "the hiring plan", "the incident from last week", "the new dashboard",
          "the migration to the new database", "the office move", "the training programme",
          "supplier contracts", "the quarterly targets", "the documentation backlog"]
VERBS = ["reviewed", "discussed", "questioned", "summarised", "proposed changes to",
         "raised concerns about", "presented", "agreed to revisit"]
OUTCOMES = ["the team agreed to proceed", "a decision was postponed until more data is available",
            "two follow-up tasks were created", "the proposal was accepted with minor changes",
            "the risks were judged acceptable", "a smaller pilot was preferred",
            "the owners will report back next week"]
FACTS = [
    "Revenue grew by {n} percent compared with the same period last year.",
    "Response times improved from {n} to {m} milliseconds after the change.",
    "About {n} customers took part in the survey, and most of them were satisfied.",
    "The project is {n} percent complete and {m} tasks remain open.",
    "Costs rose by {n} thousand because of delayed deliveries.",
    "The error rate fell to {n} per ten thousand requests.",
    "Staff turnover stayed below {n} percent for the third quarter in a row.",
    "The pilot ran in {n} cities with {m} volunteers.",
]
DOC_KINDS = ["meeting minutes", "quarterly report", "incident review", "research summary"]
INSTRUCTIONS = [
    "Summarise the document above in five bullet points.",
    "What are the three most important decisions in the document above?",
    "Write a short executive summary of the document above.",
    "List every person mentioned above and what they were responsible for.",
    "Which risks does the document above mention, and how are they handled?",
]


def lognormal_int(rng, median, sigma, lo, hi):
    v = math.exp(math.log(median) + rng.gauss(0, sigma))
    return int(min(hi, max(lo, round(v))))


def chat(rng):
    if rng.random() < 0.2:
        prompt = rng.choice(TASKS)
    else:
        t, u = rng.sample(TOPICS, 2)
        prompt = rng.choice(QUESTIONS).format(t=t, u=u, a=rng.choice(AUDIENCES))
        if rng.random() < 0.3:
            prompt = ("I have been reading about " + t + " lately and I want to understand it "
                      "properly, not just the headlines. " + prompt)
    return {"kind": "chat", "prompt": prompt, "max_tokens": lognormal_int(rng, 96, 0.6, 24, 256)}


def sentence(rng):
    r = rng.random()
    if r < 0.4:
        return (f"{rng.choice(NAMES)} from the {rng.choice(TEAMS)} team {rng.choice(VERBS)} "
                f"{rng.choice(THINGS)}, and {rng.choice(OUTCOMES)}.")
    if r < 0.75:
        return rng.choice(FACTS).format(n=rng.randint(2, 95), m=rng.randint(2, 400))
    return (f"Regarding {rng.choice(THINGS)}, {rng.choice(NAMES)} noted that "
            f"{rng.choice(THINGS)} depends on it, so {rng.choice(OUTCOMES)}.")


def doc(rng, i):
    words_target = lognormal_int(rng, 650, 0.45, 300, 1400)
    kind = rng.choice(DOC_KINDS)
    parts = [f"{kind.title()} {i + 1}: {rng.choice(TEAMS)} team, week {rng.randint(1, 52)}.", ""]
    words = 0
    while words < words_target:
        para = " ".join(sentence(rng) for _ in range(rng.randint(3, 6)))
        words += len(para.split())
        parts.append(para)
        parts.append("")
    parts.append(rng.choice(INSTRUCTIONS))
    return {"kind": "doc", "prompt": "\n".join(parts),
            "max_tokens": lognormal_int(rng, 80, 0.4, 32, 160)}


def write(name, rows):
    path = os.path.join(HERE, name)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{path}: {len(rows)} prompts, {os.path.getsize(path)} bytes")


def main():
    rng = random.Random(9)
    write("chat.jsonl", [chat(rng) for _ in range(240)])
    rng = random.Random(10)
    write("docs.jsonl", [doc(rng, i) for i in range(24)])


if __name__ == "__main__":
    main()
