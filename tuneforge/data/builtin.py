"""Built-in task generators: realistic synthetic data that needs no download.

``orders``: free-text customer messages -> a JSON object with the order's fields. The
base model rarely produces the exact schema zero-shot; a short LoRA run learns it, which
makes it a clear before/after demo with an unambiguous metric (JSON exact match).

``reviews``: a product review -> JSON with the product, a 1-5 rating and the sentiment. Same
reply format as ``orders`` but another schema, so training one after the other shows
forgetting (the model starts answering orders with review keys) and what prevents it.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import yaml

from tuneforge.data.dedup import text_key

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


REVIEW_TEMPLATES = {
    1: ["The {product} broke after two days. Total waste of money.", "Awful {product}, I want a refund.",
        "Do not buy this {product}; it stopped working right away."],
    2: ["The {product} is flimsy and smaller than pictured.", "Disappointed with the {product}, it feels cheap.",
        "Meh. The {product} works, barely, and the finish peels."],
    3: ["The {product} is okay for the price, nothing special.", "Average {product}. Does the job, no more.",
        "It's a {product}. Fine, I guess, but delivery took long."],
    4: ["Nice {product}, solid build, would buy again.", "Really like this {product}, just a bit pricey.",
        "Good {product}; works well and looks great."],
    5: ["Best {product} I have ever owned, absolutely love it!", "Perfect {product}, exceeded my expectations.",
        "Five stars for this {product}, my whole family uses it."],
}
SENTIMENT = {1: "negative", 2: "negative", 3: "neutral", 4: "positive", 5: "positive"}
REVIEW_INSTRUCTION = ("Read the product review and reply with JSON with the keys product, rating (1-5) "
                      "and sentiment (positive, neutral or negative). Reply with the JSON only.")


def reviews(n: int = 800, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        product, _ = rng.choice(PRODUCTS)
        rating = rng.randint(1, 5)
        text = rng.choice(REVIEW_TEMPLATES[rating]).format(product=product)
        if rng.random() < 0.5:
            text = f"{text} - {rng.choice(FIRST)} from {rng.choice(CITIES)}"
        answer = {"product": product, "rating": rating, "sentiment": SENTIMENT[rating]}
        yield {"instruction": REVIEW_INSTRUCTION, "input": text, "output": json.dumps(answer)}


REVIEW_PARTS = {
    "positive": (["I love this {p}.", "The {p} works perfectly.", "Great {p}, exactly as described.",
                  "Really happy with my new {p}.", "This {p} exceeded my expectations."],
                 ["Delivery to {c} was fast.", "Would buy again.", "Five stars from me.", "Highly recommended."]),
    "negative": (["The {p} broke after two days.", "Very disappointed with this {p}.", "My {p} arrived damaged.",
                  "This {p} is not worth the money.", "The {p} looks nothing like the photos."],
                 ["Delivery to {c} took weeks.", "I want a refund.", "One star.", "Avoid this seller."]),
    "neutral": (["The {p} is okay.", "It is an average {p}.", "The {p} does what it says, nothing more.",
                 "My {p} arrived as expected."], ["It shipped to {c}.", "No complaints so far.", "Price is fair."]),
}


def sentiment(n: int = 600, seed: int = 0):
    """Classification rows: product reviews labelled positive / negative / neutral."""
    rng = random.Random(seed)
    labels = list(REVIEW_PARTS)
    for _ in range(n):
        label = rng.choice(labels)
        first, second = REVIEW_PARTS[label]
        p, c = rng.choice(PRODUCTS)[0], rng.choice(CITIES)
        yield {"text": f"{rng.choice(first)} {rng.choice(second)}".format(p=p, c=c), "label": label}


def preferences(n: int = 400, seed: int = 0):
    """Preference rows for the orders task: the exact JSON is chosen over a flawed answer."""
    rng = random.Random(seed)
    flaws = [lambda a: {**a, "quantity": a["quantity"] + 1}, lambda a: {k: v for k, v in a.items() if k != "city"},
             lambda a: {**a, "customer": a["customer"].split()[0]}]
    for row in orders(n, seed):
        answer = json.loads(row["output"])
        bad = rng.choice(flaws)(answer)
        rejected = json.dumps(bad) if rng.random() < 0.7 else f"Sure! Here is the order: {json.dumps(bad)}"
        yield {"prompt": f"{row['instruction']}\n\n{row['input']}", "chosen": row["output"], "rejected": rejected}


GENERATORS = {"orders": orders, "reviews": reviews, "sentiment": sentiment, "preferences": preferences}

# Template paraphrases of a user prompt: augmentation for small sft datasets. They change
# the wording around the request, never the request or the answer.
PARAPHRASES = [
    "{p}", "Please help with the following.\n\n{p}", "{p}\n\nThank you!", "Task:\n{p}",
    "Could you do this for me?\n{p}", "Here is a request from a user.\n\n{p}", "{p}\n\nAnswer carefully.",
    "I need some help. {p}",
]


def paraphrase_rows(rows: list[dict], copies: int, seed: int = 0) -> list[dict]:
    """``copies`` synthetic variants of each sft row (last user turn re-worded by a
    template), marked ``_synthetic`` and traceable to their original by ``_where``."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        last_user = max(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
        for c, template in enumerate(rng.sample(PARAPHRASES[1:], min(copies, len(PARAPHRASES) - 1)), 1):
            msgs = [dict(m) for m in row["messages"]]
            msgs[last_user]["content"] = template.format(p=msgs[last_user]["content"])
            out.append({**row, "messages": msgs, "_where": f"{row.get('_where', '?')}#aug{c}", "_synthetic": True})
    return out


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


    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise ValueError("needs the chatterbot-corpus package: pip install chatterbot-corpus")
    for f in sorted((Path(spec.origin).parent / "data" / "english").glob("*.yml")):
        for conv in yaml.safe_load(f.read_text()).get("conversations") or []:
            utterances = [str(u).strip() for u in conv if u is not None and str(u).strip()]
            if utterances:
                yield f.stem, utterances


def topic_rows(convs, min_count: int = 40) -> tuple[list[dict], dict]:
    """Classification rows (text: a conversation's opening line, label: its category) from
    (category, [utterances]) pairs, and counts of what was left out.

    An opener is kept once per category (equal up to case and spacing): chatterbot-corpus
    1.3.3 repeats each of its 10 tech_support conversations 88-121 times (1050 of 1754
    conversations in the categories with >= 40), and kept as rows those copies made a
    60% majority class of 10 sentences; a held-out split then measured how 2 or 3 of
    those sentences were classified, not the model (see docs/objectives.md). An opener
    found under several categories ("Hello" in greetings and in conversations, "Who are
    you?" in ai and in conversations) cannot be classified from its text, so it is dropped.
    ``min_count`` applies to the distinct openers a category keeps."""
    first: dict[bytes, tuple[str, str]] = {}  # opener key -> (text as first seen, category)
    cats: dict[bytes, set[str]] = {}
    n_convs = 0
    for cat, utterances in convs:
        n_convs += 1
        key = text_key(utterances[0])
        first.setdefault(key, (utterances[0], cat))
        cats.setdefault(key, set()).add(cat)
    ambiguous = {k for k, c in cats.items() if len(c) > 1}
    per_cat: dict[str, list[str]] = {}
    for k, (text, cat) in first.items():
        if k not in ambiguous:
            per_cat.setdefault(cat, []).append(text)
    kept = {c: texts for c, texts in per_cat.items() if len(texts) >= min_count}
    rows = [{"text": t, "label": c} for c in sorted(kept) for t in kept[c]]
    stats = {"conversations": n_convs, "distinct_openers": len(first),
             "conversations_with_a_repeated_opener": n_convs - len(first),
             "openers_under_several_categories": len(ambiguous),
             "categories_kept": {c: len(kept[c]) for c in sorted(kept)},
             "categories_below_min_count": {c: len(t) for c, t in sorted(per_cat.items()) if c not in kept},
             "rows": len(rows)}
    return rows, stats


def chatterbot_topics(n: int = 100000, seed: int = 0, min_count: int = 40):
    """Classification: a conversation's opening line -> its corpus category (trivia, coding,
    psychology, ai, emotion with the defaults), one row per distinct opener, keeping
    categories with at least ``min_count`` distinct openers (see ``topic_rows``)."""
    rows, _ = topic_rows(_chatterbot_conversations(), min_count)
    random.Random(seed).shuffle(rows)
    yield from rows[:n]


def chatterbot_text(n: int = 100000, seed: int = 0):
    """Raw text for continued pre-training: each conversation as one document."""
    rows = [{"text": "\n".join(u)} for _, u in _chatterbot_conversations()]
    random.Random(seed).shuffle(rows)
    yield from rows[:n]


GENERATORS.update(chatterbot_topics=chatterbot_topics, chatterbot_text=chatterbot_text)


_QA_INSTRUCTIONS = ["Answer each of the following questions.", "Reply to every message below, in order.",
                    "Give a short answer to each question.", "Respond to these messages one by one."]


def chatterbot_instructions(n: int = 100000, seed: int = 0, max_items: int = 6):
    """Alpaca-style rows (instruction, input, output) from real chatterbot-corpus exchanges:
    1..max_items opening lines as the input, their corpus replies numbered as the output.
    Lengths vary row to row like a real instruction set (the speed benchmark's workload)."""
    pairs = [(u[0], " ".join(u[1:])) for _, u in _chatterbot_conversations() if len(u) > 1]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    rows, i = [], 0
    while len(rows) < n and i < len(pairs):
        k = rng.randint(1, max_items)
        chunk, i = pairs[i : i + k], i + k
        rows.append({"instruction": rng.choice(_QA_INSTRUCTIONS),
                     "input": "\n".join(f"{j + 1}. {q}" for j, (q, _) in enumerate(chunk)),
                     "output": "\n".join(f"{j + 1}. {a}" for j, (_, a) in enumerate(chunk))})
    yield from rows


GENERATORS["chatterbot_instructions"] = chatterbot_instructions


# --- tools: when to call a function, which one, with which arguments ------------------------
#
# Rows in OpenAI's fine-tuning shape (the loader's chat format reads them): ``tools`` is a
# list of {"type": "function", "function": {...}}, an assistant call has ``tool_calls`` with
# ``arguments`` as a JSON *string*, a result is a ``tool`` message with ``tool_call_id``.


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


CURRENCIES = {"USD": ["USD", "US dollars", "dollars"], "EUR": ["EUR", "euros"], "GBP": ["GBP", "British pounds", "pounds"],
              "JPY": ["JPY", "Japanese yen", "yen"], "CAD": ["CAD", "Canadian dollars"], "CHF": ["CHF", "Swiss francs"]}
PER_USD = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.3, "CAD": 1.36, "CHF": 0.88}
TOOL_SPECS = {
    "get_weather": _fn("get_weather", "Get the current weather in a city.",
                       {"city": {"type": "string", "description": "City name, e.g. Lisbon"},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                                 "description": "Temperature unit (default celsius)"}}, ["city"]),
    "convert_currency": _fn("convert_currency", "Convert an amount of money from one currency to another.",
                            {"amount": {"type": "number"},
                             "from_currency": {"type": "string", "enum": sorted(CURRENCIES)},
                             "to_currency": {"type": "string", "enum": sorted(CURRENCIES)}},
                            ["amount", "from_currency", "to_currency"]),
    "create_calendar_event": _fn("create_calendar_event", "Add an event to the user's calendar.",
                                 {"title": {"type": "string"},
                                  "date": {"type": "string", "description": "YYYY-MM-DD"},
                                  "time": {"type": "string", "description": "HH:MM, 24-hour clock"}},
                                 ["title", "date", "time"]),
    "lookup_order": _fn("lookup_order", "Look up the status of a customer order by its ID.",
                        {"order_id": {"type": "string", "description": "Order ID like ORD-12345"}}, ["order_id"]),
    "send_email": _fn("send_email", "Send an email on the user's behalf.",
                      {"to": {"type": "string", "description": "Recipient email address"},
                       "subject": {"type": "string"}}, ["to", "subject"]),
    "get_stock_price": _fn("get_stock_price", "Get the latest price of a stock by its ticker symbol.",
                           {"symbol": {"type": "string", "description": "Ticker symbol, e.g. AAPL"}}, ["symbol"]),
}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
EVENTS = ["Dentist appointment", "Team standup", "Lunch with Sam", "Project review", "Yoga class", "Call with the bank",
          "Parent-teacher meeting", "Flight to Berlin", "Budget planning", "Birthday dinner"]
SUBJECTS = ["Quarterly report", "Meeting notes", "Invoice 2231", "Holiday plans", "Contract renewal",
            "Welcome aboard", "Schedule change", "Thank you"]
TICKERS = {"AAPL": "Apple", "MSFT": "Microsoft", "NVDA": "Nvidia", "AMZN": "Amazon", "TSLA": "Tesla", "GOOGL": "Alphabet"}
ORDER_STATUS = [("shipped", "is on its way"), ("delivered", "has been delivered"), ("processing", "is being prepared"),
                ("cancelled", "was cancelled")]
CONDITIONS = ["sunny", "cloudy", "light rain", "snow", "windy", "clear skies", "fog"]


def _weather(rng):
    city = rng.choice(CITIES)
    unit = rng.choice(["celsius", "fahrenheit"]) if rng.random() < 0.4 else None
    ask = rng.choice(["What's the weather like in {c}?", "Is it cold in {c} right now?", "weather {c}",
                      "Can you check the current weather in {c} for me?", "How warm is it in {c} today?",
                      "I'm flying to {c} tonight - what's the weather there?"]).format(c=city)
    if unit:
        ask += rng.choice([f" Give me the temperature in {unit}.", f" Use {unit}, please.", f" ({unit})"])
    args = {"city": city, **({"unit": unit} if unit else {})}
    celsius, cond = rng.randint(-8, 34), rng.choice(CONDITIONS)
    temp = celsius if unit != "fahrenheit" else round(celsius * 9 / 5 + 32)
    result = {"city": city, "temperature": temp, "unit": unit or "celsius", "conditions": cond}
    answer = f"It's currently {temp}°{'F' if unit == 'fahrenheit' else 'C'} in {city} with {cond}."
    return ask, args, result, answer


def _currency(rng):
    src, dst = rng.sample(sorted(CURRENCIES), 2)
    amount = rng.choice([rng.randint(5, 2000), round(rng.uniform(1, 500), 2)])
    s, d = rng.choice(CURRENCIES[src]), rng.choice(CURRENCIES[dst])
    ask = rng.choice(["Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?", "What are {a} {s} worth in {d}?",
                      "I have {a} {s}. How many {d} is that?", "{a} {s} to {d} please"]).format(a=amount, s=s, d=d)
    converted = round(amount / PER_USD[src] * PER_USD[dst], 2)
    args = {"amount": amount, "from_currency": src, "to_currency": dst}
    result = {"amount": amount, "from": src, "to": dst, "converted": converted, "rate": round(PER_USD[dst] / PER_USD[src], 4)}
    return ask, args, result, f"{amount} {src} is about {converted} {dst}."


def _calendar(rng):
    title, month, day = rng.choice(EVENTS), rng.randint(1, 12), rng.randint(1, 28)
    hour, minute = rng.randint(7, 20), rng.choice([0, 0, 15, 30, 45])
    date, time_ = f"2026-{month:02d}-{day:02d}", f"{hour:02d}:{minute:02d}"
    spoken_date = rng.choice([f"{MONTHS[month - 1]} {day}, 2026", f"{day} {MONTHS[month - 1]} 2026", date])
    h12 = f"{hour % 12 or 12}{f':{minute:02d}' if minute else ''} {'pm' if hour >= 12 else 'am'}"
    spoken_time = rng.choice([time_, h12])
    ask = rng.choice(["Add '{t}' to my calendar on {d} at {h}.", "Schedule {t} for {d} at {h}.",
                      "Put a calendar event called \"{t}\" on {d}, {h}.", "Can you book {t} on {d} at {h}?"]
                     ).format(t=title, d=spoken_date, h=spoken_time)
    result = {"event_id": f"evt_{rng.randint(1000, 9999)}", "status": "created"}
    return ask, {"title": title, "date": date, "time": time_}, result, f"Done: \"{title}\" is on your calendar for {date} at {time_}."


def _order(rng):
    order_id = f"ORD-{rng.randint(10000, 99999)}"
    ask = rng.choice(["Where is my order {o}?", "Can you check the status of order {o}?", "Any update on {o}?",
                      "I ordered something last week, the ID is {o}. Has it shipped?", "status of {o}"]).format(o=order_id)
    status, prose = rng.choice(ORDER_STATUS)
    result = {"order_id": order_id, "status": status, "items": rng.randint(1, 4)}
    return ask, {"order_id": order_id}, result, f"Your order {order_id} {prose}."


def _email(rng):
    first, last = rng.choice(FIRST), rng.choice(LAST)
    to, subject = f"{first.lower()}.{last.lower()}@example.com", rng.choice(SUBJECTS)
    ask = rng.choice(["Send an email to {e} with the subject \"{s}\".", "Email {e}, subject: {s}.",
                      "Please write to {e} - subject line \"{s}\".", "Could you email {e} about \"{s}\"?"]
                     ).format(e=to, s=subject)
    result = {"message_id": f"msg_{rng.randint(100000, 999999)}", "status": "sent"}
    return ask, {"to": to, "subject": subject}, result, f"Sent your email \"{subject}\" to {to}."


def _stock(rng):
    symbol = rng.choice(sorted(TICKERS))
    name = rng.choice([symbol, TICKERS[symbol]])
    ask = rng.choice(["What's {n} trading at?", "Price of {n} stock?", "How much is one share of {n} right now?",
                      "Check the stock price for {n}."]).format(n=name)
    price = round(rng.uniform(50, 900), 2)
    result = {"symbol": symbol, "price": price, "currency": "USD"}
    return ask, {"symbol": symbol}, result, f"{TICKERS[symbol]} ({symbol}) is trading at ${price}."


TOOL_TASKS = {"get_weather": _weather, "convert_currency": _currency, "create_calendar_event": _calendar,
              "lookup_order": _order, "send_email": _email, "get_stock_price": _stock}


def _no_tool(rng) -> tuple[str, str]:
    """A message that needs no function: small talk, or a question answered directly."""
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return rng.choice([
        ("Hi there!", "Hello! How can I help you today?"),
        ("Thanks, that's all I needed.", "You're welcome! Have a great day."),
        ("What can you do?", "I can check the weather, convert currencies, manage your calendar, look up orders, "
                             "send emails and get stock prices. What would you like?"),
        (f"What is {a} times {b}?", f"{a} times {b} is {a * b}."),
        (f"What's {a} plus {b}?", f"{a} plus {b} is {a + b}."),
        ("How many days are in a week?", "There are 7 days in a week."),
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Tell me a fun fact.", "Octopuses have three hearts."),
        ("Good morning!", "Good morning! What can I do for you?"),
        ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ])


def tools(n: int = 600, seed: int = 0, no_tool_share: float = 0.15):
    """Tool-calling conversations: the user asks, the assistant calls the right function with
    the right arguments (``call_0``), the tool answers, the assistant answers from the result;
    ``no_tool_share`` of the rows need no call (a plain answer: when NOT to call). Each row
    offers 2-4 of the six tools, always the right one, in random order."""
    rng = random.Random(seed)
    names = sorted(TOOL_TASKS)
    for _ in range(n):
        needed = None if rng.random() < no_tool_share else rng.choice(names)
        others = rng.sample([x for x in names if x != needed], rng.randint(2, 4) - (needed is not None))
        offered = [*others, *([needed] if needed else [])]
        rng.shuffle(offered)
        row = {"tools": [TOOL_SPECS[x] for x in offered]}
        if needed is None:
            ask, answer = _no_tool(rng)
            row["messages"] = [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
            yield row
            continue
        ask, args, result, answer = TOOL_TASKS[needed](rng)
        call = {"id": "call_0", "type": "function", "function": {"name": needed, "arguments": json.dumps(args)}}
        row["messages"] = [{"role": "user", "content": ask},
                           {"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "call_0", "content": json.dumps(result)},
                           {"role": "assistant", "content": answer}]
        yield row


GENERATORS["tools"] = tools
