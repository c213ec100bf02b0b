"""The built-in skill suite: small string transformations a tiny model can learn on a CPU in seconds.

Each skill is an input generator, an exact answer, and several paraphrased instructions, so a router
has to read the prompt rather than a fixed tag. Inputs are drawn so that the answer never equals the
input: a model that merely copies (what the base learns in pretraining) scores nothing on a skill it
has not learned. Composite skills chain two others; no expert is trained on them, so they measure
whether merges and routers generalise.
"""

from __future__ import annotations

import random
import string
from typing import Callable

from moerge.errors import MoergeError
from moerge.tasks import real as _real
from moerge.tasks.skill import Skill

LETTERS = string.ascii_lowercase
VOWELS = set("aeiou")


def word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def any_word(rng: random.Random) -> str:
    """Letters of both cases and digits: copying them teaches the base every output symbol."""
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(3, 7)))


def word_with_repeats(rng: random.Random) -> str:
    w = list(word(rng, 3, 5))
    w.insert(rng.randrange(len(w) + 1), rng.choice(w))
    return "".join(w)


def word_with_vowels(rng: random.Random) -> str:
    w = list(word(rng, 3, 5))
    w[rng.randrange(len(w))] = rng.choice(sorted(VOWELS))
    return "".join(w)


def even_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(2 * rng.randint(2, 3)))


def two_words(rng: random.Random) -> str:
    n = rng.randint(2, 4)
    return word(rng, n, n) + " " + word(rng, n, n)


def word_and_letter(rng: random.Random) -> str:
    w = word(rng, 4, 7)
    return w + " " + rng.choice(w)


def two_numbers(rng: random.Random) -> str:
    return f"{rng.randint(0, 49)}+{rng.randint(0, 49)}"


def _dedupe(x: str) -> str:
    return "".join(dict.fromkeys(x))


def _shift(x: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] if c in LETTERS else c for c in x)


def _swap_pairs(x: str) -> str:
    chars = list(x)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def _interleave(x: str) -> str:
    a, b = x.split(" ")
    return "".join(p + q for p, q in zip(a, b))


def _count(x: str) -> str:
    w, c = x.split(" ")
    return str(w.count(c))


def _add(x: str) -> str:
    a, b = x.split("+")
    return str(int(a) + int(b))


_BASIC = [
    Skill("copy", ("repeat", "copy", "echo"), lambda x: x, any_word, identity=True),
    Skill("reverse", ("reverse", "backwards", "flip"), lambda x: x[::-1], word),
    Skill("sort", ("sort", "alphabetize", "order"), lambda x: "".join(sorted(x)), word),
    Skill("uppercase", ("uppercase", "capitalize", "shout"), str.upper, word),
    Skill("shift", ("shift", "next letter", "rotate by 1"), _shift, word),
    Skill("dedupe", ("dedupe", "unique", "no repeats"), _dedupe, word_with_repeats),
    Skill("novowels", ("drop vowels", "no vowels", "consonants"), lambda x: "".join(c for c in x if c not in VOWELS), word_with_vowels),
    Skill("swap", ("swap pairs", "pairswap", "swap"), _swap_pairs, even_word),
    Skill("double", ("double", "twice each", "stutter"), lambda x: "".join(c + c for c in x), lambda r: word(r, 2, 4)),
    Skill("rotleft", ("rotate left", "roll", "cycle"), lambda x: x[1:] + x[:1], word),
    Skill("firsthalf", ("first half", "front half", "head"), lambda x: x[: len(x) // 2], even_word),
    Skill("lasthalf", ("last half", "back half", "tail"), lambda x: x[len(x) // 2:], even_word),
    Skill("interleave", ("interleave", "zip", "weave"), _interleave, two_words),
    Skill("count", ("count", "how many", "tally"), _count, word_and_letter),
    Skill("add", ("add", "sum", "plus"), _add, two_numbers),
]


def _compose(name: str, first: Skill, second: Skill, make_input: Callable[[random.Random], str] | None = None) -> Skill:
    instructions = tuple(f"{a} then {b}" for a, b in zip(first.instructions, second.instructions))
    return Skill(name, instructions, lambda x: second.solve(first.solve(x)), make_input or first.make_input,
                 parts=(first.name, second.name))


SKILLS: dict[str, Skill] = {s.name: s for s in _BASIC}
_COMPOSITES = [
    _compose("reverse_uppercase", SKILLS["reverse"], SKILLS["uppercase"]),
    _compose("sort_dedupe", SKILLS["sort"], SKILLS["dedupe"]),
    _compose("novowels_uppercase", SKILLS["novowels"], SKILLS["uppercase"]),
    _compose("shift_reverse", SKILLS["shift"], SKILLS["reverse"]),
    _compose("dedupe_reverse", SKILLS["dedupe"], SKILLS["reverse"]),
]
SKILLS.update({s.name: s for s in _COMPOSITES})

# what the base model is pretrained on: the prompt format, copying, and a minority of skills
PRETRAIN = ("copy", "double", "rotleft", "firsthalf", "lasthalf", "interleave")
# the default experts of the demo, and the held-out composites of them
EXPERTS = ("reverse", "sort", "uppercase", "shift", "dedupe", "novowels")
QUICK_EXPERTS = ("reverse", "uppercase", "novowels")
HELDOUT = tuple(s.name for s in _COMPOSITES)
QUICK_HELDOUT = ("reverse_uppercase", "novowels_uppercase")
TINY = tuple(SKILLS)  # the suite of the built-in character base (the `all` group)

# the real-model suite (natural-language instructions for a pretrained chat model), same registry

SKILLS.update({s.name: s for s in _real.BASIC + _real.COMPOSITES})
REAL_EXPERTS, REAL_HELDOUT = _real.EXPERTS, _real.HELDOUT


def get(name: str) -> Skill:
    try:
        return SKILLS[name]
    except KeyError:
        raise MoergeError(f"unknown task {name!r}; known: {', '.join(SKILLS)}") from None
