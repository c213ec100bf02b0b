"""The real-model skill suite: deterministic natural-language instruction skills for a pretrained chat
model (SmolLM2-135M-Instruct), scored by exact match.

Each skill draws inputs from small word lists (or numbers, dates), has three paraphrased instructions,
and one exact answer. The prompt is ``"<instruction>: <input>"``; training and evaluation render it with
the model's chat template (``moerge.lm.chat``), so an expert learns to answer in the assistant turn
with the bare answer, where the base model answers in sentences. Four held-out composites chain two
word skills; no expert is trained on them.

    expert skills: reverse_words, sort_words, caps, number_words, acronym, iso_date
    held-out:      reverse_words_caps, sort_words_caps, sort_words_acronym, reverse_words_acronym
"""

from __future__ import annotations

import random

from moerge.tasks.skill import Skill

NOUNS = ("apple river stone cloud garden window silver forest candle mirror bridge engine planet violin harbor "
         "pencil castle meadow rocket island lemon tiger blanket ladder puzzle summer winter valley copper marble "
         "anchor basket canyon dragon feather glacier hammer jacket kettle lantern magnet needle orchard pepper "
         "quartz saddle tunnel velvet wagon yogurt zebra button cherry desert falcon guitar helmet insect jungle "
         "koala lobster napkin oyster parrot rabbit salmon turtle walnut").split()
MONTHS = ("January February March April May June July August September October November December").split()
ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
       "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
TEMPLATE = "{instruction}: {x}"


def number_words(n: int) -> str:
    """0..999 in English words, as style guides write them: 'three hundred forty-two'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def words(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return " ".join(rng.sample(NOUNS, rng.randint(lo, hi)))


def date_text(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 2030)}"


def _iso(x: str) -> str:
    month, day, year = x.replace(",", "").split()
    return f"{year}-{MONTHS.index(month) + 1:02d}-{int(day):02d}"


def _acronym(x: str) -> str:
    return "".join(w[0] for w in x.split()).upper()


def _skill(name, instructions, solve, make_input) -> Skill:
    return Skill(name, tuple(instructions), solve, make_input, template=TEMPLATE)


BASIC = [
    _skill("reverse_words", ("Reverse the order of these words", "Write these words in reverse order",
                             "List these words backwards, last word first"),
           lambda x: " ".join(x.split()[::-1]), words),
    _skill("sort_words", ("Sort these words alphabetically", "Put these words in alphabetical order",
                          "Arrange these words from A to Z"),
           lambda x: " ".join(sorted(x.split())), words),
    _skill("caps", ("Rewrite this in capital letters", "Convert this text to uppercase", "Write the following in all caps"),
           str.upper, lambda r: words(r, 2, 4)),
    _skill("number_words", ("Write this number in English words", "Spell out this number in words",
                            "Write the following number as words"),
           lambda x: number_words(int(x)), lambda r: str(r.randint(0, 999))),
    _skill("acronym", ("Make an acronym from the first letters of these words", "Give the capitalized initials of these words",
                       "Abbreviate these words to their first letters in capitals"),
           _acronym, lambda r: words(r, 3, 4)),
    _skill("iso_date", ("Convert this date to ISO format (YYYY-MM-DD)", "Write this date as YYYY-MM-DD",
                        "Give this date in ISO 8601 form"),
           _iso, date_text),
]
_BY = {s.name: s for s in BASIC}


def _compose(first: Skill, second: Skill) -> Skill:
    """``first`` then ``second``, asked for in one instruction."""
    instr = tuple(f"{a}, then {b[0].lower() + b[1:]}" for a, b in zip(first.instructions, second.instructions))
    return Skill(f"{first.name}_{second.name.replace('_words', '')}", instr, lambda x: second.solve(first.solve(x)),
                 first.make_input, parts=(first.name, second.name), template=TEMPLATE)


COMPOSITES = [_compose(_BY["reverse_words"], _BY["caps"]), _compose(_BY["sort_words"], _BY["caps"]),
              _compose(_BY["sort_words"], _BY["acronym"]), _compose(_BY["reverse_words"], _BY["acronym"])]
EXPERTS = tuple(s.name for s in BASIC)
HELDOUT = tuple(s.name for s in COMPOSITES)
