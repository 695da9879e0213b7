"""The bundled conversation data: three adapter domains plus a general chit-chat corpus.

`make_data(out, seed)` writes `out/<domain>/{train,validation,test}.jsonl` for each name in
`DOMAINS`, in the OpenAI `messages` format. Every conversation has a system prompt and 2 to 6 user
turns; the first user turn gives facts (a first name and a reference such as an order number) that
the last assistant answer must repeat, and every record lists them in `facts`.

`pretraining_corpus(seed)` is the general corpus (greetings, small talk, trivia) the base model is
pretrained on by `trainer init-base`. It is never written as an adapter domain, so the bare base
speaks the chat format but knows none of the domains' styles: a domain adapter has much to gain.

Everything is generated from `random.Random` seeded with strings, so one seed gives byte-identical
files on every machine and Python version (str seeds are hashed with SHA-512, not `hash()`).
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = {"train": 2000, "validation": 200, "test": 100}

FIRST_NAMES = (
    "Maria", "James", "Aisha", "Chen", "Lucas", "Sofia", "Omar", "Emma", "Ravi", "Hannah",
    "Diego", "Yuki", "Fatima", "Noah", "Elena", "Kwame", "Olivia", "Mateo", "Priya", "Liam",
    "Zara", "Ethan", "Ingrid", "Tariq", "Chloe", "Mikhail", "Amara", "Oscar", "Leila", "Jonas",
    "Nadia", "Samuel", "Keiko", "Felix", "Rosa", "Arjun", "Grace", "Pablo", "Mei", "Victor",
    "Anya", "Daniel", "Lina", "Hugo", "Sara", "Kofi", "Julia", "Ivan", "Nora", "Tomas",
)
LAST_NAMES = (
    "Garcia", "Smith", "Khan", "Wang", "Silva", "Rossi", "Haddad", "Brown", "Patel", "Schmidt",
    "Lopez", "Tanaka", "Ali", "Johnson", "Petrov", "Mensah", "Taylor", "Fernandez", "Sharma",
    "Murphy", "Hussein", "Clark", "Larsen", "Nasser", "Dubois", "Ivanov", "Okafor", "Nilsson",
    "Moreau", "Becker", "Costa", "Kim", "Novak", "Jensen", "Reyes", "Walker", "Sato", "Weber",
)
STREETS = ("Oak Street", "Maple Avenue", "High Street", "Elm Road", "Park Lane", "River Way",
           "Cedar Court", "Hill Road", "Station Road", "Lake View", "Mill Lane", "King Street")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


@dataclass(frozen=True)
class Intent:
    """One exchange: a user template and an answer template, filled from the same slots."""

    users: tuple[str, ...]
    answers: tuple[str, ...]

    def render(self, rng: random.Random, slots: dict[str, str]) -> tuple[str, str]:
        return rng.choice(self.users).format(**slots), rng.choice(self.answers).format(**slots)


@dataclass(frozen=True)
class Domain:
    """Templates and slot pools of one domain; `make_ref` draws the conversation's reference."""

    name: str
    systems: tuple[str, ...]
    make_ref: Callable[[random.Random], str]
    pools: dict[str, tuple[str, ...]]
    opening: Intent
    middle: tuple[Intent, ...]
    closing: tuple[Intent, ...]
    extra: dict[str, Callable[[random.Random], str]] = field(default_factory=dict)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _date(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}"


def _time(rng: random.Random) -> str:
    return f"{rng.randint(6, 21)}:{rng.choice(('00', '15', '30', '45'))}"


FOOD = Domain(
    name="food_ordering",
    systems=(
        "You are Crispy, the cheerful ordering assistant of Golden Fork Delivery. Keep answers "
        "short, always use the customer's first name and the order number.",
        "You are the Golden Fork Delivery order bot. Be friendly and brief, and confirm the order "
        "number in your replies.",
    ),
    make_ref=lambda rng: f"GF-{_digits(rng, 5)}",
    pools={
        "item": ("margherita pizza", "pepperoni pizza", "chicken burrito", "veggie burger",
                 "pad thai", "caesar salad", "sushi platter", "lamb kebab", "mushroom risotto",
                 "fish tacos", "ramen bowl", "falafel wrap", "butter chicken", "beef lasagna",
                 "poke bowl", "cheeseburger", "green curry", "club sandwich"),
        "side": ("garlic bread", "fries", "onion rings", "a side salad", "spring rolls",
                 "coleslaw", "miso soup", "sweet potato fries", "nachos"),
        "drink": ("a cola", "an iced tea", "a lemonade", "sparkling water", "a mango lassi",
                  "an orange juice", "a ginger ale"),
        "qty": ("one", "two", "three", "four"),
        "minutes": ("15", "20", "25", "30", "35", "40", "45"),
        "diet": ("gluten-free", "vegan", "nut-free", "dairy-free", "extra spicy", "mild"),
        "payment": ("card", "cash on delivery", "the app wallet", "a gift card"),
        "note": ("ring the bell twice", "leave it at the door", "call on arrival",
                 "use the side entrance", "knock quietly", "wait in the lobby"),
    },
    extra={"house": lambda rng: str(rng.randint(1, 199)),
           "street": lambda rng: rng.choice(STREETS)},
    opening=Intent(
        users=(
            "Hi, this is {first}. My order number is {ref}.",
            "Hello! I'm {first}, order {ref}.",
            "Hey there, {first} here. I have a question about order {ref}.",
            "Good evening, my name is {first} and my order number is {ref}.",
            "Hi, order {ref} please, name is {first}.",
        ),
        answers=(
            "Hi {first}! Order {ref} is right here. What can I do for you? Yum!",
            "Hello {first}! I've pulled up order {ref}. How can I help? Yum!",
            "Hey {first}! Got order {ref} on my screen. What would you like? Yum!",
        ),
    ),
    middle=(
        Intent(
            users=("Can I add {qty} {item} to it?", "Please add {qty} {item}.",
                   "I'd like {qty} {item} as well.", "Could you throw in {qty} {item}?"),
            answers=("Done, {first}! {qty} {item} added to order {ref}. Yum!",
                     "You got it, {first}! I added {qty} {item} to order {ref}. Yum!"),
        ),
        Intent(
            users=("Add {side} and {drink}, please.", "Can I get {side} with {drink} too?",
                   "I also want {side} and {drink}."),
            answers=("Sure thing, {first}! {side} and {drink} are on order {ref}. Yum!",
                     "Easy, {first}! I put {side} and {drink} on order {ref}. Yum!"),
        ),
        Intent(
            users=("How long until it arrives?", "When will my food get here?",
                   "What's the delivery time?", "Is it on the way yet?"),
            answers=("Good news, {first}! Order {ref} arrives in about {minutes} minutes. Yum!",
                     "{first}, your courier brings order {ref} in roughly {minutes} minutes. Yum!"),
        ),
        Intent(
            users=("Please deliver to {house} {street} instead.",
                   "Can you change the address to {house} {street}?",
                   "I moved, send it to {house} {street}."),
            answers=("No problem, {first}! Order {ref} now goes to {house} {street}. Yum!",
                     "Updated, {first}! The new address for order {ref} is {house} {street}. "
                     "Yum!"),
        ),
        Intent(
            users=("Can you make everything {diet}?", "I need the meal to be {diet}.",
                   "Is it possible to have it {diet}?"),
            answers=("Absolutely, {first}! I noted {diet} for order {ref}. Yum!",
                     "Of course, {first}! The kitchen will make order {ref} {diet}. Yum!"),
        ),
        Intent(
            users=("I'll pay with {payment}.", "Can I pay by {payment}?",
                   "Switch the payment to {payment}, please."),
            answers=("Perfect, {first}! Order {ref} will be paid with {payment}. Yum!",
                     "All set, {first}! Payment for order {ref} is {payment}. Yum!"),
        ),
        Intent(
            users=("Please tell the courier to {note}.", "Can the driver {note}?",
                   "Add a note: {note}."),
            answers=("Noted, {first}! The courier for order {ref} will {note}. Yum!",
                     "Will do, {first}! I told the driver of order {ref} to {note}. Yum!"),
        ),
    ),
    closing=(
        Intent(
            users=("Sorry, what was my order number again?",
                   "Can you remind me of my order number?", "What's my order number?"),
            answers=("Sure, {first}! Your order number is {ref}. Yum!",
                     "Of course, {first}! It's order {ref}. Yum!"),
        ),
        Intent(
            users=("Thanks, that's all.", "Great, thank you!", "Perfect, bye!"),
            answers=("Thank you, {first}! Order {ref} is on its way. Enjoy your meal! Yum!",
                     "My pleasure, {first}! Enjoy order {ref}. Yum!"),
        ),
        Intent(
            users=("Can you confirm the name and number on the order?",
                   "Just to check, whose name is the order under?"),
            answers=("Confirmed: order {ref} is under the name {first}. Yum!",
                     "Yes! Order {ref} belongs to {first}. Yum!"),
        ),
    ),
)

IT = Domain(
    name="it_helpdesk",
    systems=(
        "You are the HelpDesk assistant of Northwind IT Services. Answer formally, quote the "
        "ticket number in brackets and give numbered steps.",
        "You are Northwind IT support. Reference the ticket in square brackets, be precise, and "
        "address the user by first name.",
    ),
    make_ref=lambda rng: f"INC-{_digits(rng, 6)}",
    pools={
        "device": ("laptop", "desktop", "printer", "monitor", "docking station", "phone",
                   "tablet", "keyboard", "headset", "webcam"),
        "app": ("Outlook", "Teams", "the VPN client", "Excel", "the CRM", "Zoom", "SAP",
                "the payroll portal", "Chrome", "OneDrive", "Slack", "the HR system"),
        "error": ("0x80070005", "403 Forbidden", "timeout", "license expired", "0xC004F074",
                  "certificate invalid", "disk full", "sync conflict", "login loop"),
        "os": ("Windows 11", "Windows 10", "macOS", "Ubuntu"),
        "hours": ("2", "4", "8", "24", "48"),
        "room": ("room 101", "room 214", "the third floor", "building B", "the front desk"),
    },
    extra={"date": _date, "time": _time},
    opening=Intent(
        users=(
            "Hi, I'm {first}. My ticket number is {ref}.",
            "Hello, this is {first} about ticket {ref}.",
            "Good morning. {first} here, following up on {ref}.",
            "Hi, {first} from accounting. I opened ticket {ref} earlier.",
            "Ticket {ref}, my name is {first}.",
        ),
        answers=(
            "[{ref}] Hello {first}. I have opened your ticket. Please describe the issue.",
            "[{ref}] Good day, {first}. The ticket is assigned to me. How may I assist?",
            "[{ref}] Thank you, {first}. I have your ticket on file. What is the problem?",
        ),
    ),
    middle=(
        Intent(
            users=("{app} shows error {error}.", "I keep getting {error} in {app}.",
                   "{app} fails with {error} since this morning."),
            answers=("[{ref}] Understood, {first}. Steps: 1) Close {app}. 2) Sign out and back "
                     "in. 3) If {error} persists, reply here.",
                     "[{ref}] Noted, {first}. Steps: 1) Restart your computer. 2) Open {app} "
                     "again. 3) Report whether {error} returns."),
        ),
        Intent(
            users=("My {device} won't turn on.", "The {device} stopped working.",
                   "My {device} is broken."),
            answers=("[{ref}] Sorry to hear that, {first}. Steps: 1) Check the power cable. "
                     "2) Hold the power button for 10 seconds. 3) Bring the {device} to {room}.",
                     "[{ref}] Thank you, {first}. Steps: 1) Try another outlet. 2) If the {device} "
                     "stays dark, a technician will visit {room}."),
        ),
        Intent(
            users=("I'm on {os}, does that matter?", "My computer runs {os}.",
                   "Is {os} supported?"),
            answers=("[{ref}] Yes, {first}. {os} is supported. Steps: 1) Install pending updates. "
                     "2) Restart.",
                     "[{ref}] Noted, {first}: {os}. Steps: 1) Run the update tool. 2) Reboot "
                     "once it finishes."),
        ),
        Intent(
            users=("I forgot my password.", "Can you reset my password?",
                   "I'm locked out of my account."),
            answers=("[{ref}] Certainly, {first}. Steps: 1) Open the self-service portal. "
                     "2) Choose Reset Password. 3) Use the code sent to your phone.",
                     "[{ref}] Of course, {first}. Steps: 1) I have sent a reset link. 2) Set a "
                     "new password within {hours} hours."),
        ),
        Intent(
            users=("How long will the fix take?", "When can I expect a solution?",
                   "What is the expected resolution time?"),
            answers=("[{ref}] {first}, the expected resolution time is {hours} hours.",
                     "[{ref}] The team aims to resolve this within {hours} hours, {first}."),
        ),
        Intent(
            users=("Can a technician come on {date} at {time}?",
                   "Please book a visit for {date} at {time}.",
                   "Is {date} at {time} possible for a visit?"),
            answers=("[{ref}] Booked, {first}. A technician will visit on {date} at {time}.",
                     "[{ref}] Confirmed, {first}. Visit scheduled for {date}, {time}."),
        ),
        Intent(
            users=("I need access to {app}.", "Please grant me a license for {app}.",
                   "Can I get {app} installed?"),
            answers=("[{ref}] Request recorded, {first}. Steps: 1) Your manager approves. "
                     "2) {app} is installed within {hours} hours.",
                     "[{ref}] Understood, {first}. Steps: 1) Approval is requested. 2) You "
                     "receive {app} within {hours} hours."),
        ),
    ),
    closing=(
        Intent(
            users=("What was my ticket number again?", "Could you repeat the ticket number?",
                   "Remind me of my ticket ID, please."),
            answers=("[{ref}] {first}, your ticket number is {ref}.",
                     "[{ref}] Certainly, {first}. The ticket number is {ref}."),
        ),
        Intent(
            users=("Thank you, that's all for now.", "Thanks, you can close it.",
                   "Great, thanks for the help."),
            answers=("[{ref}] You are welcome, {first}. Ticket {ref} is now resolved.",
                     "[{ref}] Glad to help, {first}. I am closing ticket {ref}."),
        ),
        Intent(
            users=("Which name is on the ticket?", "Can you confirm who reported this?"),
            answers=("[{ref}] The ticket {ref} was reported by {first}.",
                     "[{ref}] Confirmed: {first} is the reporter of ticket {ref}."),
        ),
    ),
)

TRAVEL = Domain(
    name="travel_booking",
    systems=(
        "You are Voyager, the concierge of Bluesky Travel. Speak politely and formally, address "
        "the traveller by name, and always state the booking reference.",
        "You are the Bluesky Travel booking concierge. Use a courteous tone and confirm the "
        "booking reference in every reply.",
    ),
    make_ref=lambda rng: "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(6)),
    pools={
        "city": ("Lisbon", "Tokyo", "Nairobi", "Toronto", "Rome", "Bangkok", "Oslo", "Lima",
                 "Seoul", "Cairo", "Vienna", "Sydney", "Dublin", "Istanbul", "Prague", "Mumbai"),
        "hotel": ("the Grand Plaza", "the Harbour Inn", "the Old Town Suites", "the Skyline Hotel",
                  "the Garden Lodge", "the Riverside Hotel", "the Central Residence"),
        "seat": ("a window seat", "an aisle seat", "extra legroom", "a seat near the front"),
        "cabin": ("economy", "premium economy", "business", "first class"),
        "nights": ("two", "three", "four", "five", "seven"),
        "bags": ("one extra bag", "two checked bags", "a ski bag", "a bicycle"),
        "meal": ("a vegetarian meal", "a halal meal", "a kosher meal", "a low-salt meal"),
    },
    extra={"date": _date, "day": lambda rng: rng.choice(WEEKDAYS), "time": _time},
    opening=Intent(
        users=(
            "Hello, my name is {first} {last}. My booking reference is {ref}.",
            "Hi, {first} {last} here, reference {ref}.",
            "Good afternoon, I am {first} {last}, booking {ref}.",
            "I'm calling about booking {ref}. The name is {first} {last}.",
        ),
        answers=(
            "Good day, {first} {last}. I have booking {ref} in front of me. How may I assist "
            "you today?",
            "Welcome, {first} {last}. Booking {ref} is open. How may I be of service?",
            "Thank you, {first} {last}. I have located booking {ref}. What may I arrange for you?",
        ),
    ),
    middle=(
        Intent(
            users=("I'd like to fly to {city} on {date}.", "Can you book a flight to {city} "
                   "for {date}?", "Please find me a flight to {city} on {date}."),
            answers=("Certainly, {first}. A flight to {city} on {date} at {time} has been added "
                     "to booking {ref}.",
                     "With pleasure, {first}. I have reserved the {time} flight to {city} on "
                     "{date} under booking {ref}."),
        ),
        Intent(
            users=("I need a hotel for {nights} nights.", "Book {hotel} for {nights} nights, "
                   "please.", "Can you add {nights} nights at {hotel}?"),
            answers=("Of course, {first}. {nights} nights at {hotel} are now part of booking "
                     "{ref}.",
                     "Certainly, {first}. I have reserved {hotel} for {nights} nights on booking "
                     "{ref}."),
        ),
        Intent(
            users=("Could I have {seat}?", "I'd prefer {seat}, please.",
                   "Please reserve {seat} for me."),
            answers=("Certainly, {first}. {seat} is reserved on booking {ref}.",
                     "With pleasure, {first}. I have noted {seat} for booking {ref}."),
        ),
        Intent(
            users=("Can I upgrade to {cabin}?", "How about {cabin} instead?",
                   "Please move me to {cabin}."),
            answers=("Of course, {first}. Booking {ref} is now in {cabin}.",
                     "Certainly, {first}. I have upgraded booking {ref} to {cabin}."),
        ),
        Intent(
            users=("I'm travelling with {bags}.", "Please add {bags}.",
                   "Can I bring {bags}?"),
            answers=("Certainly, {first}. {bags} has been added to booking {ref}.",
                     "Of course, {first}. Booking {ref} now includes {bags}."),
        ),
        Intent(
            users=("I would like {meal} on the flight.", "Please order {meal} for me.",
                   "Can you arrange {meal}?"),
            answers=("With pleasure, {first}. {meal} is requested on booking {ref}.",
                     "Certainly, {first}. I have arranged {meal} for booking {ref}."),
        ),
        Intent(
            users=("Can I move the departure to {day}?", "Please change the date to {date}.",
                   "Is an earlier flight on {day} possible?"),
            answers=("Certainly, {first}. I have moved booking {ref} to {day}, {date}.",
                     "Of course, {first}. Booking {ref} now departs on {day}, {date} at {time}."),
        ),
    ),
    closing=(
        Intent(
            users=("Could you repeat my booking reference?", "What is my reference again?",
                   "Remind me of the booking code, please."),
            answers=("Certainly, {first} {last}. Your booking reference is {ref}.",
                     "Of course, {first} {last}. The reference is {ref}."),
        ),
        Intent(
            users=("Thank you, that will be all.", "Many thanks, goodbye.",
                   "Wonderful, thank you."),
            answers=("It was my pleasure, {first} {last}. Booking {ref} is confirmed. Have a "
                     "pleasant journey.",
                     "You are most welcome, {first} {last}. Booking {ref} is all set. Bon "
                     "voyage."),
        ),
        Intent(
            users=("Under which name is the booking?", "Please confirm the traveller's name."),
            answers=("Certainly. Booking {ref} is under the name {first} {last}.",
                     "Of course. The traveller on booking {ref} is {first} {last}."),
        ),
    ),
)

DOMAIN_SPECS = {d.name: d for d in (FOOD, IT, TRAVEL)}
DOMAINS: tuple[str, ...] = tuple(DOMAIN_SPECS)


def _slots(domain: Domain, rng: random.Random, fixed: dict[str, str]) -> dict[str, str]:
    """Fresh values for every pool (one draw each) plus the conversation's fixed slots."""
    slots = {key: rng.choice(pool) for key, pool in domain.pools.items()}
    slots.update({key: draw(rng) for key, draw in domain.extra.items()})
    slots.update(fixed)
    return slots


def _capitalise(text: str) -> str:
    # Slot values are lower case ("two checked bags"); a sentence may start with one.
    return text[:1].upper() + text[1:]


def make_conversation(domain: Domain, rng: random.Random, conv_id: str) -> dict:
    """One conversation record: system prompt, opening, 0-4 middle turns, closing recall."""
    fixed = {"first": rng.choice(FIRST_NAMES), "last": rng.choice(LAST_NAMES),
             "ref": domain.make_ref(rng)}
    middle = rng.sample(domain.middle, rng.randint(0, 4))
    intents = [domain.opening, *middle, rng.choice(domain.closing)]
    messages = [{"role": "system", "content": rng.choice(domain.systems)}]
    for intent in intents:
        user, answer = intent.render(rng, _slots(domain, rng, fixed))
        messages.append({"role": "user", "content": _capitalise(user)})
        messages.append({"role": "assistant", "content": _capitalise(answer)})
    # The closing answer repeats these; the eval suite checks them.
    facts = [fixed["ref"], fixed["first"]]
    return {"id": conv_id, "messages": messages, "facts": facts, "meta": {"domain": domain.name}}


def domain_conversations(name: str, split: str, count: int, seed: int = 0) -> list[dict]:
    """`count` conversations of domain `name` for `split`, from their own random stream."""
    rng = random.Random(f"switchboard:{seed}:{name}:{split}")
    domain = DOMAIN_SPECS[name]
    return [make_conversation(domain, rng, f"{name}-{split}-{i:05d}") for i in range(count)]


GENERAL_SYSTEMS = ("You are a helpful assistant.", "You are a friendly assistant. Answer briefly.")
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow",
           "coal": "black", "a tomato": "red", "an orange": "orange", "a plum": "purple"}
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Canada": "Ottawa",
            "Italy": "Rome", "Norway": "Oslo", "Peru": "Lima", "Egypt": "Cairo",
            "Austria": "Vienna", "Ireland": "Dublin", "Spain": "Madrid", "India": "New Delhi"}


def _general_exchange(rng: random.Random, first: str) -> tuple[str, str]:
    """One generic question and answer; deliberately unlike any adapter domain's style."""
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        thing, colour = rng.choice(sorted(COLOURS.items()))
        return f"What colour is {thing}?", f"{_capitalise(thing)} is usually {colour}."
    if kind == 2:
        country, city = rng.choice(sorted(CAPITALS.items()))
        return f"What is the capital of {country}?", f"The capital of {country} is {city}."
    if kind == 3:
        day = rng.randrange(7)
        return (f"What day comes after {WEEKDAYS[day]}?",
                f"After {WEEKDAYS[day]} comes {WEEKDAYS[(day + 1) % 7]}.")
    if kind == 4:
        return rng.choice((("How are you?", "I am doing well, thank you for asking."),
                           ("Tell me something nice.", "You are doing a great job today."),
                           ("Can you help me?", "Yes, of course. What do you need?")))
    return "Do you remember my name?", f"Yes, your name is {first}."


def general_conversation(rng: random.Random, conv_id: str) -> dict:
    first = rng.choice(FIRST_NAMES)
    messages = [{"role": "system", "content": rng.choice(GENERAL_SYSTEMS)}]
    greeting = rng.choice(("Hi, I am {0}.", "Hello, my name is {0}.", "Hey, {0} here."))
    messages += [{"role": "user", "content": greeting.format(first)},
                 {"role": "assistant", "content": f"Hello {first}, nice to meet you."}]
    for _ in range(rng.randint(1, 3)):
        user, answer = _general_exchange(rng, first)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"id": conv_id, "messages": messages, "facts": [first], "meta": {"domain": "general"}}


def pretraining_corpus(seed: int = 0, count: int = 2000) -> list[dict]:
    """The general chit-chat corpus the base is pretrained on (never an adapter domain)."""
    rng = random.Random(f"switchboard:{seed}:general")
    return [general_conversation(rng, f"general-{i:05d}") for i in range(count)]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in records)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def make_data(out: Path, seed: int = 0) -> dict:
    """Write every domain's splits under `out`; returns {domain: {split: count}}."""
    out = Path(out)
    counts: dict[str, dict[str, int]] = {}
    for name in DOMAINS:
        counts[name] = {}
        for split, count in SPLITS.items():
            records = domain_conversations(name, split, count, seed)
            _write_jsonl(out / name / f"{split}.jsonl", records)
            counts[name][split] = count
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    counts = make_data(args.out, seed=args.seed)
    for name, splits in counts.items():
        detail = ", ".join(f"{split} {n}" for split, n in splits.items())
        print(f"{args.out / name}: {detail}")
    print(f"wrote {len(counts)} domains in {time.perf_counter() - start:.1f}s (seed {args.seed})")
    return 0
