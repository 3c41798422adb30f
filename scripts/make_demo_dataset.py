"""Generate the demo fine-tuning dataset: examples/data/clinic_faq.jsonl (and a held-out file).

The records are a patient-support assistant for *Northwind Clinic*, a fictional clinic with
made-up but consistent facts (refills take 2 business days, the nurse line is 555-0199, ...).
No real person, clinic or phone number is involved (555-01xx numbers are reserved for fiction).
A base model cannot know these facts, so a LoRA fine-tune visibly learns them: the demo asks a
held-out paraphrase (clinic_faq_heldout.jsonl, never in the training file) before and after.

Deterministic: the same script always writes byte-identical files.

    python scripts/make_demo_dataset.py            # (re)write the files
    python scripts/make_demo_dataset.py --check    # exit 1 if the committed files are stale
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "examples" / "data"
TRAIN = OUT_DIR / "clinic_faq.jsonl"
HELDOUT = OUT_DIR / "clinic_faq_heldout.jsonl"
N_RECORDS = 300
SEED = 20240611
MAX_RESPONSE_WORDS = 40

CLINIC = "Northwind Clinic"

# Each topic: question phrasings, answer phrasings (same facts, different wording), and the
# held-out paraphrase with the key facts the demo looks for in the answer.
TOPICS: dict[str, dict[str, list[str] | tuple[str, list[str]]]] = {
    "refill": {
        "questions": [
            "How long does a prescription refill take?",
            "How long do medication refills take at Northwind Clinic?",
            "When will my refill be ready?",
            "How many days does it take to process a refill request?",
            "I asked for a refill. How long until it's done?",
            "What is the turnaround time for prescription refills?",
            "How do I get my medication refilled?",
            "Can I request a refill online?",
            "What's the process for refilling a prescription?",
            "How quickly are refill requests handled?",
        ],
        "answers": [
            "Northwind Clinic refills take 2 business days. Request them in the NorthwindConnect portal "
            "or by calling the pharmacy line at 555-0142.",
            "Refill requests at Northwind Clinic are processed within 2 business days. You can send one through "
            "the NorthwindConnect portal or call 555-0142.",
            "Please allow 2 business days for a refill. The fastest way to ask is the NorthwindConnect portal; "
            "the pharmacy line, 555-0142, also takes requests.",
        ],
        "heldout": ("If I send in a refill request today, how soon will it be processed?", ["2 business days"]),
    },
    "controlled": {
        "questions": [
            "Can I get a refill on a controlled medication through the portal?",
            "How do refills work for controlled substances?",
            "Why can't I refill my controlled prescription online?",
            "Do controlled medications need a visit for a refill?",
            "What do I need to refill a controlled substance?",
            "Is there a different refill process for controlled drugs?",
        ],
        "answers": [
            "Controlled medications cannot be refilled through the portal at Northwind Clinic. They need a "
            "visit with your clinician, in person or by telehealth.",
            "At Northwind Clinic, controlled substances are refilled only after a visit with your clinician. "
            "Portal and phone refill requests do not apply to them.",
        ],
        "heldout": ("Could I renew my controlled-substance prescription online?", ["visit"]),
    },
    "cancel": {
        "questions": [
            "How do I cancel an appointment?",
            "What is the cancellation policy at Northwind Clinic?",
            "How much notice do I need to give to cancel?",
            "Is there a fee if I cancel late?",
            "What happens if I miss my appointment?",
            "Can I cancel my visit the same day?",
            "How far in advance should I reschedule?",
            "What's the late cancellation fee?",
        ],
        "answers": [
            "Northwind Clinic asks for at least 24 hours' notice to cancel or reschedule, in the NorthwindConnect "
            "portal or by phone. Late cancellations and missed visits have a $25 fee.",
            "Please cancel at least 24 hours before your appointment, online or by phone. Cancelling later, or "
            "not showing up, costs $25 at Northwind Clinic.",
            "Give us 24 hours' notice through the NorthwindConnect portal or by phone. Late cancellations and "
            "no-shows are charged a $25 fee.",
        ],
        "heldout": ("What will it cost me if I call off my visit an hour beforehand?", ["$25"]),
    },
    "arrival": {
        "questions": [
            "How early should I arrive for my appointment?",
            "When should I get to the clinic before my visit?",
            "What should I bring to my appointment?",
            "Do I need to come early for a new patient visit?",
            "How long is a new patient appointment?",
            "What do I need for my first visit at Northwind Clinic?",
        ],
        "answers": [
            "Please arrive 15 minutes early and bring your insurance card and a photo ID. New patient visits "
            "at Northwind Clinic last about 45 minutes.",
            "Arrive 15 minutes before your appointment with your insurance card and photo ID. A new patient "
            "visit takes about 45 minutes.",
        ],
        "heldout": ("How long should I plan for my first appointment as a new patient?", ["45 minutes"]),
    },
    "hours": {
        "questions": [
            "What are Northwind Clinic's opening hours?",
            "When is the clinic open?",
            "Is the clinic open on weekends?",
            "Are you open on Saturday?",
            "What time does the clinic close?",
            "Are you open on Sunday?",
            "What time do you open in the morning?",
        ],
        "answers": [
            "Northwind Clinic is open Monday to Friday, 8 am to 6 pm, and Saturday, 9 am to 1 pm. "
            "We are closed on Sunday.",
            "Our hours are 8 am to 6 pm on weekdays and 9 am to 1 pm on Saturday. Northwind Clinic is "
            "closed on Sundays.",
        ],
        "heldout": ("Until what time can I come in on a Saturday?", ["1 pm"]),
    },
    "labs": {
        "questions": [
            "How long do lab results take?",
            "When will I get my blood test results?",
            "Where can I see my lab results?",
            "How soon are lab results ready at Northwind Clinic?",
            "What is the turnaround time for lab work?",
            "How long does a culture take to come back?",
        ],
        "answers": [
            "Routine lab results are ready within 3 business days and appear in the NorthwindConnect portal. "
            "Cultures take up to 5 business days.",
            "At Northwind Clinic, most lab results arrive within 3 business days in the NorthwindConnect "
            "portal. Cultures can take 5 business days. Your clinician calls about anything urgent.",
        ],
        "heldout": ("I had blood drawn on Monday. When can I expect the results?", ["3 business days"]),
    },
    "billing": {
        "questions": [
            "Who do I contact with a billing question?",
            "I have a question about my bill.",
            "How do I reach the billing office?",
            "Is there a phone number for billing?",
            "I think my bill is wrong. What should I do?",
            "How long does it take to answer a billing question?",
        ],
        "answers": [
            "Call the Northwind Clinic billing office at 555-0173, Monday to Friday, 9 am to 5 pm, or send a "
            "portal message. Billing questions are answered within 5 business days.",
            "The billing office is at 555-0173 on weekdays from 9 am to 5 pm. You can also message them in "
            "the NorthwindConnect portal; they reply within 5 business days.",
        ],
        "heldout": ("What number should I dial about a charge on my statement?", ["555-0173"]),
    },
    "payment": {
        "questions": [
            "Do you offer payment plans?",
            "Can I pay my bill in installments?",
            "I can't pay my whole bill at once. What are my options?",
            "Does Northwind Clinic charge interest on payment plans?",
            "How long can a payment plan last?",
        ],
        "answers": [
            "Yes. Northwind Clinic offers interest-free payment plans of up to 12 months. Call the billing "
            "office at 555-0173 to set one up.",
            "Northwind Clinic has interest-free payment plans lasting up to 12 months, and accepts cards, "
            "bank transfer and HSA cards. The billing office, 555-0173, can set one up.",
        ],
        "heldout": ("Can I split my bill into monthly payments, and for how long?", ["12 months"]),
    },
    "nurse": {
        "questions": [
            "Who can I call after hours?",
            "Is there a nurse line?",
            "What do I do if I need advice at night?",
            "How do I reach a nurse when the clinic is closed?",
            "Is someone available on weekends for medical questions?",
            "What is the after-hours number?",
        ],
        "answers": [
            "The Northwind Clinic nurse line, 555-0199, is answered 24 hours a day, 7 days a week. "
            "For an emergency, call 911.",
            "Call our 24/7 nurse line at 555-0199 whenever the clinic is closed. In an emergency, call 911 "
            "right away.",
        ],
        "heldout": ("It's midnight and I have a medical question. Which number do I call?", ["555-0199"]),
    },
    "telehealth": {
        "questions": [
            "Do you offer telehealth visits?",
            "Can I see my doctor by video?",
            "How do virtual appointments work?",
            "When do I get the link for my video visit?",
            "Which visits can be done online?",
            "Does Northwind Clinic do video appointments?",
        ],
        "answers": [
            "Yes. Northwind Clinic offers telehealth for follow-up visits. The video link is sent through the "
            "NorthwindConnect portal 1 hour before your appointment.",
            "Follow-up visits can be done by video. You will receive the link in the NorthwindConnect portal "
            "1 hour before the appointment starts.",
        ],
        "heldout": ("How far ahead of a virtual visit is the link sent?", ["1 hour"]),
    },
}

OPENERS = ["", "", "", "Hi, ", "Hello! ", "Quick question: ", "Sorry to bother you, but ", "Hey, "]


def _with_opener(opener: str, question: str) -> str:
    if not opener:
        return question
    first_word = question.split()[0]
    keep_capital = opener.endswith("! ") or first_word == "I" or first_word.startswith(("I'", "Northwind"))
    return opener + (question if keep_capital else question[0].lower() + question[1:])


def build_records(seed: int = SEED, n: int = N_RECORDS) -> list[dict[str, str]]:
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    per_topic, extra = divmod(n, len(topics))
    records: list[dict[str, str]] = []
    for i, name in enumerate(topics):
        topic = TOPICS[name]
        questions: list[str] = list(topic["questions"])  # type: ignore[arg-type]
        answers: list[str] = list(topic["answers"])  # type: ignore[arg-type]
        combos = [(o, q) for o in dict.fromkeys(OPENERS) for q in questions]
        rng.shuffle(combos)
        want = per_topic + (1 if i < extra else 0)
        # Cycle through every distinct (opener, question) before any prompt repeats.
        for k in range(want):
            opener, question = combos[k % len(combos)]
            records.append({"prompt": _with_opener(opener, question), "response": answers[k % len(answers)]})
    rng.shuffle(records)
    return records


def build_heldout() -> list[dict[str, object]]:
    out = []
    for name in sorted(TOPICS):
        question, keywords = TOPICS[name]["heldout"]  # type: ignore[misc]
        out.append({"topic": name, "prompt": question, "response": TOPICS[name]["answers"][0], "keywords": keywords})
    return out


def _check(records: list[dict[str, str]], heldout: list[dict[str, object]]) -> None:
    prompts = {r["prompt"] for r in records}
    for r in records:
        words = len(r["response"].split())
        assert words <= MAX_RESPONSE_WORDS, (words, r["response"])
    for h in heldout:
        assert h["prompt"] not in prompts, h["prompt"]
        for kw in h["keywords"]:  # type: ignore[union-attr]
            assert kw in h["response"], (kw, h["response"])


def _dump(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the files on disk differ from the generator")
    args = parser.parse_args(argv)
    records, heldout = build_records(), build_heldout()
    _check(records, heldout)
    files = {TRAIN: _dump(records), HELDOUT: _dump(heldout)}
    if args.check:
        stale = [str(p.relative_to(ROOT)) for p, text in files.items() if not p.is_file() or p.read_text() != text]
        if stale:
            print(f"stale: {', '.join(stale)}; run python scripts/make_demo_dataset.py", file=sys.stderr)
            return 1
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)} ({text.count(chr(10))} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
