"""A seeded generator of customer-service utterances over 14 intents.

Every intent has several phrasings (templates); each phrasing belongs to
either the training or the held-out family, so a test score measures how well
a model generalises to wordings it never saw. Utterances carry personal data
the way real tickets do (names, emails, phone numbers, card-like numbers,
order ids) and some typos.
"""

from __future__ import annotations

import random

import pandas as pd

INTENTS: dict[str, list[str]] = {
    "order_status": ["where is my order {order}", "can you tell me the status of order {order}",
                     "has {order} shipped yet", "I want to track my package {order}",
                     "any update on my order? it's {order}", "what's happening with {order}"],
    "refund": ["I want a refund for {order}", "please refund my money for order {order}",
               "how do I get my money back for {order}", "I returned {order}, when is my refund coming",
               "refund request, order {order}, email {email}", "still waiting on the refund for {order}"],
    "cancel_order": ["cancel order {order} please", "I need to cancel {order}", "please stop order {order}",
                     "I changed my mind, cancel {order}", "can I still cancel {order}?",
                     "don't ship {order}, I want to cancel it"],
    "change_address": ["I moved, change the delivery address for {order}", "update my shipping address please",
                       "wrong address on {order}, can you fix it", "send {order} to my new address",
                       "my name is {name}, please change my address", "deliver to a different address"],
    "payment_failed": ["my card {card} was declined", "payment failed for {order}",
                       "why was my payment rejected? card {card}", "checkout keeps failing with my card",
                       "the payment didn't go through, call me at {phone}", "card {card} got an error at checkout"],
    "delivery_delay": ["my package is late", "{order} should have arrived yesterday",
                       "delivery is delayed again for {order}", "why is my order taking so long",
                       "it's been two weeks and {order} still hasn't come", "the courier missed the delivery date"],
    "damaged_item": ["the item in {order} arrived broken", "my package was damaged",
                     "the box was crushed and the product is cracked", "{order} came damaged, what now",
                     "I received a broken item, I'm {name}", "the screen was smashed when it arrived"],
    "wrong_item": ["I got the wrong item in {order}", "this is not what I ordered",
                   "you sent me the wrong size", "{order} contains someone else's product",
                   "received a different colour than I ordered", "wrong product delivered, order {order}"],
    "account_access": ["I can't log in to my account", "reset my password please, email {email}",
                       "my account is locked", "I forgot my password", "login keeps failing for {email}",
                       "I'm locked out, my phone is {phone}"],
    "update_payment_method": ["I want to add a new card", "replace my card with {card}",
                              "update my payment details", "remove my old card from the account",
                              "change the card on file to {card}", "how do I switch my payment method"],
    "promo_code": ["my discount code doesn't work", "the promo code was not applied to {order}",
                   "coupon rejected at checkout", "how do I use a voucher",
                   "I forgot to apply my promo code to {order}", "the sale price wasn't applied"],
    "product_question": ["is this jacket waterproof", "does it come in other sizes",
                         "what are the dimensions of this table", "is the battery included",
                         "does this phone case fit the new model", "what material is this made of"],
    "speak_to_agent": ["I want to talk to a human", "connect me to an agent",
                       "can someone call me at {phone}", "let me speak to a real person",
                       "I need a person, this is {name}", "transfer me to customer service"],
    "invoice_request": ["send me the invoice for {order}", "I need a receipt for {order}",
                        "can I get a VAT invoice, email {email}", "where can I download my invoice",
                        "please email the bill for {order} to {email}", "I need proof of purchase for {order}"],
}
HELD_OUT_PER_INTENT = 2  # the last phrasings of each intent are for testing only
FIRST = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam"]
LAST = ["Smith", "Garcia", "Nguyen", "Okafor", "Muller", "Rossi", "Kowalski", "Tanaka", "Silva", "Dubois"]


def _slot_values(rng: random.Random) -> dict[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    card = " ".join(f"{rng.randrange(10000):04d}" for _ in range(4))
    return {"name": f"{first} {last}", "email": f"{first.lower()}.{last.lower()}{rng.randrange(100)}@example.com",
            "phone": f"+44 7{rng.randrange(100, 999)} {rng.randrange(100000, 999999)}",
            "card": card, "order": rng.choice(["ORD-", "#"]) + str(rng.randrange(100000, 9999999))}


def _typo(text: str, rng: random.Random) -> str:
    """Swap two neighbouring letters in one word: the most common typing slip."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 3]
    if not candidates:
        return text
    i = rng.choice(candidates)
    j = rng.randrange(len(words[i]) - 1)
    word = words[i]
    words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2:]
    return " ".join(words)


def generate_utterances(per_intent: int = 240, typo_rate: float = 0.15, seed: int = 42) -> pd.DataFrame:
    """``per_intent`` utterances per intent (3,360 by default), each tagged train or held_out by phrasing."""
    rng = random.Random(seed)
    rows = []
    for intent, templates in INTENTS.items():
        for n in range(per_intent):
            index = n % len(templates)
            template = templates[index]
            if rng.random() < typo_rate:  # in the wording, not in the personal data the slots fill
                template = _typo(template, rng)
            text = template.format(**_slot_values(rng))
            text = text[0].upper() + text[1:] if rng.random() < 0.5 else text
            rows.append({"user_id": f"user-{rng.randrange(50000)}", "text": text, "intent": intent,
                         "phrasing": f"{intent}/{index}",
                         "family": "held_out" if index >= len(templates) - HELD_OUT_PER_INTENT else "train"})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
