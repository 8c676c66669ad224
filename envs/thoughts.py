"""The thought-collapse measures (docs/ALGORITHM.md §4.5): grounding and diversity.

Concept: GTR names "thought collapse", answers whose thoughts stop describing the state in front
of them. Two numbers measure it from the answers alone: ``thought_grounding``, the share of the
state's facts (the game's ``facts()``) that a thought names, and ``thought_diversity``, whether
answers to different states have different thoughts.

Use: ``thought_grounding("current 2, target 4, so I move up", ["current 2", "target 4"])`` gives
``1.0``; ``thought_diversity(["a", "a"], [1, 2])`` gives ``0.0``.
"""
from __future__ import annotations

import collections
import re
from functools import lru_cache


@lru_cache(maxsize=4096)
def _whole_phrase(fact: str) -> re.Pattern:
    """``fact`` standing alone, in any case: not inside a longer word or number ("2" is not in
    "12")."""
    return re.compile(r"(?<!\w)%s(?!\w)" % re.escape(fact), re.IGNORECASE)


def thought_grounding(thoughts: str | None, facts) -> float:
    """Share of the state's ``facts`` that ``thoughts`` names, in [0, 1] (docs/ALGORITHM.md §4.5).

    ``facts`` are the phrases of the game's ``facts()`` at the state the answer replied to. A fact
    is named where it stands as whole words, in any case; one the state holds twice (two cards
    of value 6) must be named twice. An answer without thoughts (None) names nothing.
    """
    if not facts:
        raise ValueError("facts is empty: a game's facts() must name at least one thing its "
                         "state shows")
    needed = collections.Counter(facts)
    named = sum(min(count, len(_whole_phrase(fact).findall(thoughts or "")))
                for fact, count in needed.items())
    return named / len(facts)


def thought_diversity(thoughts, states) -> float:
    """Share of the pairs of answers to different states whose thoughts differ
    (docs/ALGORITHM.md §4.5).

    1 when no two different states got the same thought; 0 when one thought answered every state
    (the collapse GTR describes). Pairs of answers to the same state do not count, so sampling
    several thoughts for one state neither raises nor lowers it. ``thoughts``: one string per
    answer (None, no thoughts, counts as one and the same thought); ``states``: one hashable per
    answer, e.g. its facts as a tuple. NaN when every answer replied to the same state.
    """
    if len(thoughts) != len(states):
        raise ValueError(f"{len(thoughts)} thoughts but {len(states)} states: pass one state per "
                         "answer")

    def pairs_alike(keys):  # pairs of answers whose keys are equal
        return sum(n * (n - 1) // 2 for n in collections.Counter(keys).values())

    different_states = len(states) * (len(states) - 1) // 2 - pairs_alike(states)
    if different_states == 0:
        return float("nan")
    same_thought_different_state = pairs_alike(thoughts) - pairs_alike(zip(thoughts, states))
    return 1.0 - same_thought_different_state / different_states
