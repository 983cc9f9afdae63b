"""The generalized toy's expressions (gtoy, gRefCOCO's kind): several targets ("the two red
shapes", "both circles", "all blue things") and none (a colour, shape or both that no object of
the image has: "the purple star", in the singular like a single-object expression, so only the
image tells them apart). Each is parsed back and must resolve to exactly its targets."""
from __future__ import annotations

from .expressions import GENERIC_NOUNS, PLURAL, group_of
from .shapes import COLOURS, PALETTE, SHAPES

__all__ = ["NO_TARGET_SHARE", "parse_generalized", "resolve_generalized",
           "multi_target_expressions", "no_target_expressions"]

NO_TARGET_SHARE = 0.10     # of all refs and sentences, as in gRefCOCO
COUNT_WORDS = {2: "two", 3: "three"}
WORD_TO_COUNT = {word: count for count, word in COUNT_WORDS.items()}
SINGULAR = {plural: noun for noun, plural in PLURAL.items() if noun != "one"}
PLURAL_GENERIC_NOUNS = tuple(noun for noun in GENERIC_NOUNS if noun != "one")  # not "the two ones"


def parse_generalized(sentence: str) -> dict:
    """A sentence -> {"colour", "shape", "plural", "count"}: the objects it can refer to are
    those of that colour and shape; plural sentences name all of them (count: how many it says,
    when it says), singular ones exactly one."""
    colour = shape = count = None
    plural = False
    for token in sentence.lower().split():
        if token in PALETTE:
            colour = token
        elif token in SHAPES:
            shape = token
        elif token in SINGULAR:
            plural = True
            shape = token[:-1] if token[:-1] in SHAPES else shape
        elif token in WORD_TO_COUNT:
            count, plural = WORD_TO_COUNT[token], True
        elif token in ("both",):
            count, plural = 2, True
        elif token in ("all", "every"):
            plural = True
    return {"colour": colour, "shape": shape, "plural": plural, "count": count}


def resolve_generalized(sentence: str, objects: list[dict]) -> list[int] | None:
    """The objects a sentence refers to ([] for none), or None when it is ill-formed here (a
    singular sentence matching several objects, a number that does not match)."""
    parsed = parse_generalized(sentence)
    group = group_of({"colour": parsed["colour"], "shape": parsed["shape"]}, objects)
    if not parsed["plural"]:
        return group if len(group) <= 1 else None
    if len(group) < 2 or (parsed["count"] is not None and parsed["count"] != len(group)):
        return None
    return group


def render_plural(colour, shape, size, rng) -> str:
    """A plural expression for the `size` objects of a colour and/or shape."""
    noun = shape or PLURAL_GENERIC_NOUNS[rng.integers(len(PLURAL_GENERIC_NOUNS))]
    phrase = f"{colour + ' ' if colour else ''}{PLURAL[noun]}"
    if size == 2:
        options = (f"the two {phrase}", f"both {phrase}", f"the {phrase}")
    elif size == 3:
        options = (f"the three {phrase}", f"all {phrase}", f"the {phrase}")
    else:
        options = (f"all {phrase}", f"the {phrase}")
    return options[rng.integers(len(options))]


def multi_target_expressions(objects, rng, used, max_refs=2):
    """[(targets, sentences)] for colour / shape groups of two or more objects."""
    groups = {}
    for colour in (None,) + COLOURS:
        for shape in (None,) + SHAPES:
            if colour is None and shape is None:
                continue
            members = tuple(group_of({"colour": colour, "shape": shape}, objects))
            if len(members) >= 2:
                groups.setdefault(members, []).append((colour, shape))
    found = []
    for members in [list(groups)[i] for i in rng.permutation(len(groups))][:max_refs]:
        sentences = []
        for colour, shape in groups[members]:
            for _ in range(2):
                sentence = render_plural(colour, shape, len(members), rng)
                if sentence not in used and resolve_generalized(sentence, objects) == list(members):
                    used.add(sentence)
                    sentences.append(sentence)
        if sentences:
            found.append((list(members), sentences[:3]))
    return found


def no_target_expressions(objects, rng, used, count):
    """Up to ``count`` singular expressions that no object of the scene answers to."""
    found = []
    for _ in range(50):
        if len(found) == count:
            break
        kind = rng.integers(3)
        colour = COLOURS[rng.integers(len(COLOURS))] if kind != 2 else None
        shape = SHAPES[rng.integers(len(SHAPES))] if kind != 1 else None
        noun = shape or ("thing", "shape", "object")[rng.integers(3)]
        sentence = f"the {colour + ' ' if colour else ''}{noun}"
        if sentence not in used and resolve_generalized(sentence, objects) == []:
            used.add(sentence)
            found.append(sentence)
    return found
