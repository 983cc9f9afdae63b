"""The toy's referring expressions for one object: a structured description (colour, shape,
selector), resolved against the scene with clear margins, rendered from templates and parsed
back, so that every sentence kept names exactly its object and no two objects of an image share a
sentence."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .shapes import COLOURS, PALETTE, SHAPES

__all__ = ["PLURAL", "GENERIC_NOUNS", "group_of", "resolve_expression", "render_expression",
           "parse_expression", "expressions_for_scene", "capitalise"]

SIZE_RATIO = 1.3            # min area ratio for "the largest/smallest ..."
POS_GAP = 0.12              # min centre gap (fraction of min(W, H)) for "leftmost ..."

PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles",
          "diamond": "diamonds", "star": "stars", "shape": "shapes",
          "object": "objects", "one": "ones", "thing": "things"}
GENERIC_NOUNS = ("shape", "object", "one", "thing")

# selector -> words that signal it (used by the parser; templates use only these).
SELECTOR_WORDS = {
    ("size", "max"): ("larger", "bigger", "largest", "biggest"),
    ("size", "min"): ("smaller", "smallest"),
    ("pos", "left"): ("left", "leftmost"),
    ("pos", "right"): ("right", "rightmost"),
    ("pos", "top"): ("top", "topmost", "upper", "highest"),
    ("pos", "bottom"): ("bottom", "bottommost", "lower", "lowest"),
}
SELECTORS = tuple(SELECTOR_WORDS)

# Templates: (for a group of exactly two, for a group of three or more).
# "{np}" = "[colour] noun", "{nps}" = its plural.
TEMPLATES = {
    ("size", "max"): (("the larger {np}", "the bigger {np}", "the larger of the two {nps}"),
                      ("the largest {np}", "the biggest {np}")),
    ("size", "min"): (("the smaller {np}", "the smaller of the two {nps}"),
                      ("the smallest {np}",)),
    ("pos", "left"): (("the {np} on the left", "the left {np}"),
                      ("the leftmost {np}", "the {np} furthest to the left", "the {np} on the far left")),
    ("pos", "right"): (("the {np} on the right", "the right {np}"),
                       ("the rightmost {np}", "the {np} furthest to the right", "the {np} on the far right")),
    ("pos", "top"): (("the top {np}", "the {np} at the top", "the upper {np}"),
                     ("the topmost {np}", "the highest {np}", "the {np} at the very top")),
    ("pos", "bottom"): (("the bottom {np}", "the {np} at the bottom", "the lower {np}"),
                        ("the lowest {np}", "the bottommost {np}", "the {np} at the very bottom")),
}


def group_of(desc: dict, objects: list[dict]) -> list[int]:
    """Indices of the objects of the description's colour and shape (None: any)."""
    return [i for i, o in enumerate(objects)
            if (desc.get("colour") is None or o["colour"] == desc["colour"])
            and (desc.get("shape") is None or o["shape"] == desc["shape"])]


def resolve_expression(desc: dict, objects: list[dict], min_side: float) -> list[int]:
    """Indices of the objects a structured description can refer to.

    ``desc`` = ``{"colour": str|None, "shape": str|None, "selector": (kind, which)|None}``;
    ``objects`` = dicts with ``colour``, ``shape``, ``area``, ``cx``, ``cy``.  A selector
    picks the extreme of the filtered group only if it is clearly separated from the
    runner-up (area ratio >= 1.3 / centre gap >= 12 % of the short image side);
    otherwise every member of the group stays a candidate (ambiguous).  A selector on a
    group of one is considered meaningless and returns no candidate.
    """
    group = group_of(desc, objects)
    sel = desc.get("selector")
    if sel is None:
        return group
    if len(group) < 2:
        return []
    kind, which = sel
    if kind == "size":
        key = [objects[i]["area"] for i in group]
        order = np.argsort(key)
        if which == "max":
            best, second = key[order[-1]], key[order[-2]]
            ok = best >= SIZE_RATIO * second
            pick = group[order[-1]]
        else:
            best, second = key[order[0]], key[order[1]]
            ok = second >= SIZE_RATIO * best
            pick = group[order[0]]
    else:
        coord = "cx" if which in ("left", "right") else "cy"
        key = [objects[i][coord] for i in group]
        order = np.argsort(key)
        if which in ("left", "top"):
            a, b = order[0], order[1]
        else:
            a, b = order[-1], order[-2]
        ok = abs(key[a] - key[b]) >= POS_GAP * min_side
        pick = group[a]
    return [pick] if ok else group


def render_expression(desc: dict, group_size: int, rng: np.random.Generator) -> str:
    """Turn a structured description into a lower-case sentence (random template)."""
    colour, shape, sel = desc.get("colour"), desc.get("shape"), desc.get("selector")
    noun = shape if shape is not None else GENERIC_NOUNS[rng.integers(len(GENERIC_NOUNS))]
    if sel is None:
        if colour is None and shape is None:
            raise ValueError("a description needs a filter or a selector")
        return f"the {colour + ' ' if colour else ''}{noun}"
    choices = TEMPLATES[sel][0 if group_size == 2 else 1]
    tpl = choices[rng.integers(len(choices))]
    if "{nps}" in tpl and noun == "one" and colour is None:
        noun = "shape"        # "the larger of the two ones" is not English
    np_ = f"{colour + ' ' if colour else ''}{noun}"
    nps = f"{colour + ' ' if colour else ''}{PLURAL[noun]}"
    return tpl.format(np=np_, nps=nps)


WORD_TO_SELECTOR = {w: s for s, ws in SELECTOR_WORDS.items() for w in ws}
WORD_TO_SHAPE = {**{s: s for s in SHAPES}, **{PLURAL[s]: s for s in SHAPES}}


def parse_expression(sent: str) -> dict:
    """Inverse of :func:`render_expression`: sentence -> structured description.

    Raises ``ValueError`` when the sentence mentions two colours, shapes or selectors.
    """
    colour = shape = sel = None
    for tok in sent.lower().split():
        if tok in PALETTE:
            if colour is not None and colour != tok:
                raise ValueError(f"two colours in {sent!r}")
            colour = tok
        elif tok in WORD_TO_SHAPE:
            if shape is not None and shape != WORD_TO_SHAPE[tok]:
                raise ValueError(f"two shapes in {sent!r}")
            shape = WORD_TO_SHAPE[tok]
        elif tok in WORD_TO_SELECTOR:
            if sel is not None and sel != WORD_TO_SELECTOR[tok]:
                raise ValueError(f"two selectors in {sent!r}")
            sel = WORD_TO_SELECTOR[tok]
    return {"colour": colour, "shape": shape, "selector": sel}


def candidate_descriptions():
    """Every structured description: colour, shape and selector, each possibly None (not all)."""
    for colour in (None,) + COLOURS:
        for shape in (None,) + SHAPES:
            for sel in (None,) + SELECTORS:
                if colour is None and shape is None and sel is None:
                    continue
                yield {"colour": colour, "shape": shape, "selector": sel}


ALL_DESCRIPTIONS = list(candidate_descriptions())


def expressions_for_scene(objects, min_side, rng, max_per_object=3):
    """For every object: a list of 0-3 unambiguous sentences (unique within the image)."""
    present_c = {o["colour"] for o in objects}
    present_s = {o["shape"] for o in objects}
    valid = defaultdict(list)          # object index -> [(kind, desc, group size)]
    for desc in ALL_DESCRIPTIONS:
        if (desc["colour"] is not None and desc["colour"] not in present_c) or \
                (desc["shape"] is not None and desc["shape"] not in present_s):
            continue
        hit = resolve_expression(desc, objects, min_side)
        if len(hit) != 1:
            continue
        kind = "attr" if desc["selector"] is None else desc["selector"][0]
        valid[hit[0]].append((kind, desc, len(group_of(desc, objects))))

    used: set[str] = set()
    out = []
    for i in range(len(objects)):
        cands = valid.get(i, [])
        want = int(rng.integers(2, max_per_object + 1))
        # Random order, then round-robin over kinds so an object gets a mix of
        # attribute / size / position expressions whenever possible.
        perm = rng.permutation(len(cands))
        by_kind = defaultdict(list)
        for j in perm:
            by_kind[cands[j][0]].append(cands[j])
        kinds = [k for k in ("attr", "size", "pos") if by_kind[k]]
        kinds = [kinds[j] for j in rng.permutation(len(kinds))]
        picked: list[str] = []
        while len(picked) < want and any(by_kind[k] for k in kinds):
            for k in kinds:
                if len(picked) >= want or not by_kind[k]:
                    continue
                _, desc, gsize = by_kind[k].pop(0)
                sent = render_expression(desc, gsize, rng)
                back = parse_expression(sent)
                if back != desc:   # template bug guard: text must mean the description
                    raise AssertionError(f"{sent!r} parses to {back}, expected {desc}")
                if resolve_expression(back, objects, min_side) != [i] or sent in used:
                    continue
                used.add(sent)
                picked.append(sent)
        out.append(picked)
    return out


def capitalise(s: str) -> str:
    """The REFER 'raw' form of a sentence."""
    return s[:1].upper() + s[1:]
