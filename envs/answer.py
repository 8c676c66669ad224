"""The answer format and its readers: what a model writes and what an environment reads from it.

Concept: the agent answers every picture with a JSON object ``{"thoughts": "...", "action":
"..."}`` (docs/ALGORITHM.md §1, §5). ``format_answer`` writes one; ``parse_action``,
``extract_thoughts`` and ``action_span`` read one with a tolerant, linear-time scanner, which
must never raise on whatever a model writes. ``thought_action_masks`` projects the action's
characters onto a response's tokens, for any tokenizer (the log-prob of §2 weighs the two apart).

Use: ``format_answer("current 2, target 4, so I move up", "+")`` gives
``{"thoughts": "current 2, target 4, so I move up", "action": "+"}``, and
``parse_action(that_text, ["-", "+"])`` gives ``1``.
"""
from __future__ import annotations

import json
import re

import torch

ANSWER_INSTRUCTION = ('Answer only with JSON: {"thoughts": "...", "action": "..."}, action being '
                      'one admissible action.')


# How every answer in the format opens: its first token is the one that collapsed answers lose.
ANSWER_OPENING = '{"thoughts": "'


def format_answer(thoughts: str, action: str) -> str:
    """The answer format, exactly ``{"thoughts": "<thoughts>", "action": "<action>"}``
    (JSON-escaped)."""
    return json.dumps({"thoughts": thoughts, "action": action})


def _key_pattern(key: str) -> re.Pattern:
    # Either `"key":` / `'key':` (the key, a colon, spaces), or a lone double quote, which
    # opens an ordinary JSON string that the reader skips whole. Nothing here can backtrack
    # more than one run of spaces, so a search is linear in the text.
    return re.compile(r"""(["'])%s\1\s*:\s*|\"""" % key)


_KEYS = {"action": _key_pattern("action"), "thoughts": _key_pattern("thoughts")}
# An unquoted value: up to , } ] a line end or a quote.
_BARE_VALUE = re.compile(r"""[^,}\]\r\n"']*""")


def _closing_quote(text: str, start: int, quote: str) -> int:
    """Index of the first ``quote`` at or after ``start`` not escaped by a backslash, or -1."""
    end = text.find(quote, start)
    while end != -1:
        backslashes = 0
        while end - 1 - backslashes >= start and text[end - 1 - backslashes] == "\\":
            backslashes += 1
        if backslashes % 2 == 0:
            return end
        end = text.find(quote, end + 1)
    return -1


def _field_values(text: str, key: str):
    """Yield (value, quoted, start, end) for every ``"key": value`` of ``text`` that is not
    inside another JSON string; [start, end) is the field's characters, from the key's opening
    quote to the value's closing quote.

    Why a hand-written scanner and not ``json.loads``: a model's answer is often not JSON at
    all (prose around it, code fences, single quotes, a cut-off end). The scanner reads double
    quoted strings as units, so a key quoted inside the thoughts (json.dumps escapes it as
    \\"action\\") is never mistaken for the real one. A string value that is never closed runs
    to the end of the text (a generation cut off by the token limit). A nested object as value
    is stepped into, its keys read in turn. Every character is visited a bounded number of
    times: linear time even on megabytes.
    """
    pattern, pos, n = _KEYS[key], 0, len(text)
    while True:
        m = pattern.search(text, pos)
        if m is None:
            return
        if m.group(1) is None:  # an ordinary string: skip to its end
            end = _closing_quote(text, m.end(), '"')
            if end == -1:
                return
            pos = end + 1
            continue
        start = m.end()
        if start < n and text[start] in "\"'":
            end = _closing_quote(text, start + 1, text[start])
            stop = n if end == -1 else end
            yield text[start + 1:stop], True, m.start(), min(stop + 1, n)
            pos = stop + 1
        elif start < n and text[start] in "{[":
            pos = start  # a nested object or list: read the keys inside it
        else:
            bare = _BARE_VALUE.match(text, start)
            yield bare.group(), False, m.start(), bare.end()
            pos = max(bare.end(), m.end())


def _unescape(raw: str) -> str:
    """Undo JSON string escapes (\\n, \\", \\u0041 ...); text that is not valid JSON stays raw."""
    if "\\" not in raw:
        return raw
    try:
        return json.loads('"' + raw.replace("\\'", "'") + '"')
    except ValueError:
        return raw


def parse_action(text: str, actions: list[str]) -> int | None:
    """The id of the action named after ``"action":`` in a model's answer, or None.

    Every ``action`` field outside other strings counts; they must all name the same admissible
    action (exact match after stripping spaces, so "10" is never "1"), else the answer is
    ambiguous and None is returned. No field at all is None too. Never raises.
    """
    if not isinstance(text, str):
        return None
    longest = max((len(a) for a in actions), default=0)
    chosen = None
    for raw, _quoted, _start, _end in _field_values(text, "action"):
        if len(raw) > longest + 64:  # far too long to be an action name: skip the decoding work
            return None
        value = _unescape(raw).strip()
        if value not in actions or (chosen is not None and actions[chosen] != value):
            return None
        chosen = actions.index(value)
    return chosen


def extract_thoughts(text: str) -> str | None:
    """The (unescaped) string value of the first ``"thoughts"`` field, or None. Never raises."""
    if not isinstance(text, str):
        return None
    raw, quoted, _start, _end = next(_field_values(text, "thoughts"), ("", False, 0, 0))
    return _unescape(raw) if quoted else None


_NEXT_KEY = re.compile(r"""(\s*[,{])\s*["'][A-Za-z_]+["']\s*:""")  # a separator, then a key


def action_span(text: str) -> tuple[int, int] | None:
    """Character span [start, end) of the action part of an answer, or None if it has no
    ``action`` field. Never raises.

    The policy weights these characters' tokens by 1 and the rest by lambda (docs/ALGORITHM.md
    §2), so the span is found by the same scanner as ``parse_action``: an ``"action":`` quoted
    inside the thoughts is not the action. The span starts at the first real ``action`` key and
    runs to the end of the text when nothing but closing characters follows its value (the
    usual thoughts-first answer: the action part is "the tokens from \"action\": on"), or to
    the separator before the next key when the model put the action first.
    """
    if not isinstance(text, str):
        return None
    field = next(_field_values(text, "action"), None)
    if field is None:
        return None
    _, _, start, end = field
    following = _NEXT_KEY.match(text, end)
    return start, (following.end(1) if following else len(text))


def thought_action_masks(tokenizer, ids, action_span):
    """(thought_mask, action_mask) over one response's tokens: a token is action if it overlaps
    the characters `action_span` finds in the decoded answer (docs/ALGORITHM.md §2). Offsets
    in the text, not token ids: the reference's hard-coded id triple fits one tokenizer only."""
    ids = list(ids)
    prefixes = tokenizer.batch_decode([ids[: i + 1] for i in range(len(ids))],
                                      skip_special_tokens=False, clean_up_tokenization_spaces=False)
    span = action_span(prefixes[-1]) if prefixes else None  # the last prefix is the whole answer
    ends = [len(prefix) for prefix in prefixes]  # decoding prefixes works for any tokenizer
    starts = [0] + ends[:-1]
    action = [span is not None and s < span[1] and e > span[0] for s, e in zip(starts, ends)]
    action_mask = torch.tensor(action, dtype=torch.bool)
    return ~action_mask, action_mask
