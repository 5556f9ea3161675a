"""Built-in task generators: realistic synthetic data that needs no download.

``orders``: free-text customer messages -> a JSON object with the order's fields. The
base model rarely produces the exact schema zero-shot; a short LoRA run learns it, which
makes it a clear before/after demo with an unambiguous metric (JSON exact match).
"""

from __future__ import annotations

import json
import random

FIRST = ["Maria", "James", "Aisha", "Chen", "Olga", "Diego", "Fatima", "Liam", "Priya", "Kenji", "Sofia",
         "Noah", "Amara", "Lucas", "Ingrid", "Omar", "Hannah", "Mateo", "Yuki", "Elena", "Kwame", "Zoe",
         "Ravi", "Clara", "Tomasz", "Leila", "Samuel", "Mei", "Jonas", "Isabel"]
LAST = ["Lopez", "Smith", "Khan", "Wang", "Petrova", "Garcia", "Haddad", "Murphy", "Sharma", "Tanaka",
        "Rossi", "Brown", "Okafor", "Silva", "Larsen", "Farouk", "Schmidt", "Fernandez", "Sato", "Novak",
        "Mensah", "Dubois", "Patel", "Weber", "Kowalski", "Nasser", "Adams", "Lin", "Berg", "Costa"]
PRODUCTS = [("coffee mug", "coffee mugs"), ("desk lamp", "desk lamps"), ("wireless mouse", "wireless mice"),
            ("yoga mat", "yoga mats"), ("water bottle", "water bottles"), ("notebook", "notebooks"),
            ("phone charger", "phone chargers"), ("backpack", "backpacks"), ("umbrella", "umbrellas"),
            ("t-shirt", "t-shirts"), ("pair of headphones", "pairs of headphones"), ("teapot", "teapots"),
            ("keyboard", "keyboards"), ("candle", "candles"), ("frying pan", "frying pans"),
            ("bike helmet", "bike helmets"), ("wall clock", "wall clocks"), ("pillow", "pillows"),
            ("sketchbook", "sketchbooks"), ("flower pot", "flower pots")]
CITIES = ["Lisbon", "Toronto", "Nairobi", "Osaka", "Berlin", "Austin", "Lyon", "Krakow", "Melbourne",
          "Bogota", "Dublin", "Seoul", "Cairo", "Oslo", "Chennai", "Denver", "Porto", "Accra", "Vienna", "Quito"]
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
         9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}
TEMPLATES = [
    "Hi, this is {name}. I'd like to order {qty} {product} delivered to {city}, please.",
    "Please ship {qty} {product} to {city}. Thanks, {name}",
    "{name} here from {city} - could you send me {qty} {product}?",
    "Order request: {qty} x {product}. Customer: {name}. Deliver to: {city}.",
    "Can I get {qty} {product}? Send them to my place in {city}. - {name}",
    "Good morning! My name is {name} and I need {qty} {product} for our office in {city}.",
    "Hello, I want to buy {qty} {product}. Shipping address is in {city}. Regards, {name}.",
    "We're out of stock at the {city} shop, so please dispatch {qty} {product}. Signed, {name}",
    "{name} would like {qty} {product}, shipped to {city} as soon as possible.",
    "Quick one: {qty} {product} to {city}, invoice under {name}.",
    "Dear team, kindly deliver {qty} {product} to {city}. Best wishes, {name}",
    "My partner and I just moved to {city}. Could {name} order {qty} {product} there?",
    "Hey! {qty} {product} please. I'm {name} and I live in {city}.",
    "For the {city} event we need {qty} {product}. Contact person: {name}.",
    "Ordering {qty} {product} for delivery in {city}. Name on the order: {name}.",
    "Could you send {qty} {product} my way? I'm in {city}. Cheers, {name}",
]
INSTRUCTION = ("Extract the order from the customer's message as JSON with the keys "
               "customer, product, quantity and city. Reply with the JSON only.")


def orders(n: int = 800, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        singular, plural = rng.choice(PRODUCTS)
        qty = rng.randint(1, 12)
        city = rng.choice(CITIES)
        qty_text = WORDS[qty] if rng.random() < 0.4 else str(qty)
        if qty == 1:
            qty_text = rng.choice(["one", "a", "1"])
            if qty_text == "a" and singular[0] in "aeiou":
                qty_text = "an"
        text = rng.choice(TEMPLATES).format(name=name, qty=qty_text, product=singular if qty == 1 else plural, city=city)
        answer = {"customer": name, "product": singular, "quantity": qty, "city": city}
        yield {"instruction": INSTRUCTION, "input": text, "output": json.dumps(answer)}


GENERATORS = {"orders": orders}


def generate(task: str, **params):
    if task not in GENERATORS:
        raise ValueError(f"unknown built-in task '{task}'; known: {', '.join(GENERATORS)}")
    return GENERATORS[task](**params)


def _order_prose(answer: dict) -> str:
    return f"{answer['customer']} wants {answer['quantity']} {answer['product']} in {answer['city']}."


def orders_preference(n: int = 400, seed: int = 0):
    """Preference pairs on the orders task: the chosen answer is the exact JSON; the rejected
    one is the same order as prose (wrong format) or JSON with one field wrong."""
    rng = random.Random(seed + 7919)
    for row in orders(n, seed):
        answer = json.loads(row["output"])
        if rng.random() < 0.5:
            rejected = _order_prose(answer)
        else:
            wrong = dict(answer)
            key = rng.choice(["quantity", "city", "product"])
            wrong[key] = {"quantity": lambda: answer["quantity"] % 12 + 1,
                          "city": lambda: rng.choice([c for c in CITIES if c != answer["city"]]),
                          "product": lambda: rng.choice([p for p, _ in PRODUCTS if p != answer["product"]])}[key]()
            rejected = json.dumps(wrong)
        yield {"prompt": f"{row['instruction']}\n\n{row['input']}", "chosen": row["output"], "rejected": rejected}


GENERATORS["orders_preference"] = orders_preference


def _chatterbot_conversations():
    """(category, [utterances]) from the chatterbot-corpus package's English YAML files (real text)."""
    import importlib.util
    from pathlib import Path

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise ValueError("needs the chatterbot-corpus package: pip install chatterbot-corpus")
    for f in sorted((Path(spec.origin).parent / "data" / "english").glob("*.yml")):
        for conv in yaml.safe_load(f.read_text()).get("conversations") or []:
            utterances = [str(u).strip() for u in conv if u is not None and str(u).strip()]
            if utterances:
                yield f.stem, utterances


def chatterbot_topics(n: int = 100000, seed: int = 0, min_count: int = 40):
    """Classification: a conversation's opening line -> its corpus category (tech_support,
    trivia, coding, ai, ...), keeping categories with at least ``min_count`` conversations."""
    convs = list(_chatterbot_conversations())
    counts = {cat: sum(c == cat for c, _ in convs) for cat, _ in convs}
    rows = [{"text": u[0], "label": cat} for cat, u in convs if counts[cat] >= min_count]
    random.Random(seed).shuffle(rows)
    yield from rows[:n]


def chatterbot_text(n: int = 100000, seed: int = 0):
    """Raw text for continued pre-training: each conversation as one document."""
    rows = [{"text": "\n".join(u)} for _, u in _chatterbot_conversations()]
    random.Random(seed).shuffle(rows)
    yield from rows[:n]


GENERATORS.update(chatterbot_topics=chatterbot_topics, chatterbot_text=chatterbot_text)
