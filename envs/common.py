"""Shared pieces of the card environments: drawing, the answer format and its parser.

Concept: every environment here is an image-in, text-out game (docs/ALGORITHM.md §1, §5: RL4VLM's
gym_cards). The observation is an RGB picture, and the agent is a language model that answers
with a JSON object ``{"thoughts": "...", "action": "..."}``. This module holds what all four
games share:

- drawing with Pillow alone: the built-in scalable font, playing cards as rounded rectangles
  with a big rank and a suit symbol made of simple shapes (no font or image files, so nothing
  depends on the working directory, a weak point of the reference, docs/ALGORITHM.md §6);
- the answer format (``format_answer``) and its tolerant, linear-time readers
  (``parse_action``, ``extract_thoughts``), which must never raise on whatever a model writes;
- ``VisualTextEnv``, the small base class giving every game its image size, render mode,
  ``actions`` list and ``parse`` method;
- the thought-collapse measures (docs/ALGORITHM.md §4.5): ``thought_grounding`` (how much of
  the state a thought names, against the game's ``facts()``) and ``thought_diversity`` (whether
  answers to different states have different thoughts).

Use: ``format_answer("current 2, target 4, so I move up", "+")`` gives
``{"thoughts": "current 2, target 4, so I move up", "action": "+"}``, and
``parse_action(that_text, ["-", "+"])`` gives ``1``, and
``thought_grounding("current 2, target 4, so I move up", ["current 2", "target 4"])`` gives ``1.0``.
"""
from __future__ import annotations

import collections
import json
import re
from functools import lru_cache

import gymnasium as gym
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# ----------------------------------------------------------------------------- cards

RANK_NAMES = {1: "A", 11: "J", 12: "Q", 13: "K"}
SUITS = ("S", "H", "D", "C")  # spades, hearts, diamonds, clubs
CARD_RATIO = 1.4  # height / width of a playing card (5:7)

WHITE = (255, 255, 255)
INK = (20, 20, 20)  # near-black: text, card outlines, black suits
RED = (200, 0, 0)  # hearts and diamonds
CARD_BACK = (40, 70, 150)


def rank_name(rank: int) -> str:
    """What a card shows: A, 2..10, J, Q, K."""
    return RANK_NAMES.get(rank, str(rank))


def card_value(rank: int) -> int:
    """The card's number in the arithmetic games and Blackjack: J, Q and K count 10, A counts 1."""
    return min(rank, 10)


def check_ranks(ranks, count_ok, what: str) -> list[int]:
    """Validate card ranks from ``reset(options=...)``; ``count_ok(n)`` says which counts are fine."""
    if not isinstance(ranks, (list, tuple)):
        raise ValueError(f"{what} must be a list of card ranks, got {ranks!r}; pass e.g. [1, 13].")
    if not count_ok(len(ranks)):
        raise ValueError(f"{what} has the wrong number of cards ({len(ranks)}): {list(ranks)!r}.")
    for r in ranks:
        # bool is an int subclass, but True as a card is surely a mistake.
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= 13:
            raise ValueError(f"{what} holds {r!r}; ranks are integers 1..13 (A=1, J=11, Q=12, K=13).")
    return [int(r) for r in ranks]


def check_option_keys(options: dict | None, allowed: set[str]) -> dict:
    """``reset(options=...)``: None or {} mean a random state; unknown keys are a mistake."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"options must be a dict, got {type(options).__name__}.")
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; this environment accepts {sorted(allowed)}.")
    return options


# ----------------------------------------------------------------------------- drawing


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` pixels, loaded once per size (loading is the slow part)."""
    return ImageFont.load_default(size=size)


def stroke(size: int) -> int:
    """Outline width that makes the thin default font look bold, so it survives downscaling."""
    return max(1, size // 20)


@lru_cache(maxsize=4096)
def largest_font_size(text: str, max_w: float, max_h: float) -> int:
    """Largest font size whose (bold) rendering of ``text`` fits in ``max_w`` x ``max_h``."""
    lo, hi = 1, max(2, int(max_h * 2))
    while lo < hi:  # binary search for the last size that fits
        mid = (lo + hi + 1) // 2
        left, top, right, bottom = font(mid).getbbox(text, stroke_width=stroke(mid))
        if right - left <= max_w and bottom - top <= max_h:
            lo = mid
        else:
            hi = mid - 1
    return lo


@lru_cache(maxsize=4096)
def _text_mask(text: str, size: int) -> tuple[Image.Image, int, int]:
    """The bold ink of ``text`` as a mask cropped to its ink box, with the box's offset from the
    drawing origin. Rendering a stroked glyph is the slow part of a frame; labels, card ranks
    and most formulas recur, so each is rendered once."""
    f, sw = font(size), stroke(size)
    left, top, right, bottom = f.getbbox(text, stroke_width=sw)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=f, fill=255, stroke_width=sw, stroke_fill=255)
    return mask, left, top


def draw_text(image: Image.Image, xy, text: str, size: int, fill=INK, center: bool = False) -> None:
    """Bold text with its origin at the top-left ``xy``, or with its ink box centred on ``xy``.

    Centring uses the ink box rather than the font's line box, so digits (which have no
    descenders) sit in the visual middle of a card.
    """
    mask, left, top = _text_mask(text, size)
    x, y = xy
    if center:
        x, y = x - mask.width / 2, y - mask.height / 2
    else:
        x, y = x + left, y + top
    x, y = round(x), round(y)
    image.paste(fill, (x, y, x + mask.width, y + mask.height), mask)


def draw_suit(draw: ImageDraw.ImageDraw, suit: str, cx: float, cy: float, s: float, fill) -> None:
    """A suit symbol of size ``s`` centred on (cx, cy), built from circles and triangles
    (the default font has no suit glyphs)."""

    def disc(x, y, r):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)

    stem = [(cx, cy), (cx - 0.2 * s, cy + 0.5 * s), (cx + 0.2 * s, cy + 0.5 * s)]
    if suit == "D":
        draw.polygon([(cx, cy - s / 2), (cx + 0.38 * s, cy), (cx, cy + s / 2), (cx - 0.38 * s, cy)], fill=fill)
    elif suit == "H":  # two lobes on top of a triangle pointing down
        disc(cx - 0.24 * s, cy - 0.2 * s, 0.26 * s)
        disc(cx + 0.24 * s, cy - 0.2 * s, 0.26 * s)
        draw.polygon([(cx - 0.49 * s, cy - 0.12 * s), (cx + 0.49 * s, cy - 0.12 * s), (cx, cy + 0.5 * s)], fill=fill)
    elif suit == "S":  # an upside-down heart on a stem
        disc(cx - 0.24 * s, cy + 0.08 * s, 0.24 * s)
        disc(cx + 0.24 * s, cy + 0.08 * s, 0.24 * s)
        draw.polygon([(cx - 0.47 * s, cy + 0.02 * s), (cx + 0.47 * s, cy + 0.02 * s), (cx, cy - 0.5 * s)], fill=fill)
        draw.polygon(stem, fill=fill)
    else:  # "C": three discs on a stem
        for dx, dy in ((0, -0.24), (-0.25, 0.06), (0.25, 0.06)):
            disc(cx + dx * s, cy + dy * s, 0.22 * s)
        draw.polygon(stem, fill=fill)


@lru_cache(maxsize=1024)
def card_tile(rank: int, suit: str, width: int, height: int) -> Image.Image:
    """One face-up card, drawn once per (rank, suit, size) and then only pasted.

    The rank is as big as the card allows (every rank uses the size that fits "10", so all
    cards look alike): it is what a tiny model, seeing the picture at 56-112 px, must read.
    """
    tile = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(tile)
    draw.rounded_rectangle((0, 0, width - 1, height - 1), radius=max(2, width // 8),
                           fill=WHITE, outline=INK, width=max(1, width // 30))
    color = RED if suit in "HD" else INK
    size = largest_font_size("10", width * 0.84, height * 0.5)
    draw_text(tile, (width / 2, height * 0.36), rank_name(rank), size, color, center=True)
    draw_suit(draw, suit, width / 2, height * 0.79, min(width * 0.36, height * 0.27), color)
    return tile


@lru_cache(maxsize=64)
def card_back_tile(width: int, height: int) -> Image.Image:
    """A face-down card: a blue back with a light inner frame (no rank can be read)."""
    tile = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(tile)
    draw.rounded_rectangle((0, 0, width - 1, height - 1), radius=max(2, width // 8),
                           fill=CARD_BACK, outline=INK, width=max(1, width // 30))
    m = width // 8
    draw.rounded_rectangle((m, m, width - 1 - m, height - 1 - m), radius=max(1, width // 12),
                           outline=(200, 210, 240), width=max(1, width // 25))
    return tile


def hand_boxes(n: int, box, gap: int, slots: int = 0) -> list[tuple[int, int, int, int]]:
    """Fixed positions (x, y, w, h) for ``n`` cards inside ``box`` = (x0, y0, x1, y1).

    Picks the number of rows that gives the largest cards, fills rows left to right and never
    jitters, so a card keeps its place in every frame. ``slots`` reserves room for that many
    cards, so cards do not shrink while a hand grows up to it.
    """
    x0, y0, x1, y1 = box
    count = max(n, slots, 1)
    best_w, best_cols = 0.0, count
    for rows in range(1, count + 1):
        cols = -(-count // rows)  # ceil
        w = min((x1 - x0 - gap * (cols - 1)) / cols, (y1 - y0 - gap * (rows - 1)) / rows / CARD_RATIO)
        if w > best_w:
            best_w, best_cols = w, cols
    w, h = int(best_w), int(best_w * CARD_RATIO)
    return [(x0 + (i % best_cols) * (w + gap), y0 + (i // best_cols) * (h + gap), w, h) for i in range(n)]


def paste_cards(image: Image.Image, cards, boxes, face_up: int | None = None) -> None:
    """Paste (rank, suit) cards into ``boxes``; cards from index ``face_up`` on are face down."""
    for i, ((rank, suit), (x, y, w, h)) in enumerate(zip(cards, boxes)):
        hidden = face_up is not None and i >= face_up
        image.paste(card_back_tile(w, h) if hidden else card_tile(rank, suit, w, h), (x, y))


def wrap_words(words: list[str], size: int, max_w: float) -> list[str]:
    """Greedy line wrapping of ``words`` (joined by spaces) for the bold font at ``size``."""
    f, lines = font(size), []
    for word in words:
        if lines and f.getlength(lines[-1] + " " + word) + 2 * stroke(size) <= max_w:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


# ----------------------------------------------------------------------------- answers

ANSWER_INSTRUCTION = 'Answer only with JSON: {"thoughts": "...", "action": "..."}, action being one admissible action.'


# How every answer in the format opens: its first token is the one that collapsed answers lose.
ANSWER_OPENING = '{"thoughts": "'


def format_answer(thoughts: str, action: str) -> str:
    """The answer format, exactly ``{"thoughts": "<thoughts>", "action": "<action>"}`` (JSON-escaped)."""
    return json.dumps({"thoughts": thoughts, "action": action})


def _key_pattern(key: str) -> re.Pattern:
    # Either `"key":` / `'key':` (the key, a colon, spaces), or a lone double quote, which
    # opens an ordinary JSON string that the reader skips whole. Nothing here can backtrack
    # more than one run of spaces, so a search is linear in the text.
    return re.compile(r"""(["'])%s\1\s*:\s*|\"""" % key)


_KEYS = {"action": _key_pattern("action"), "thoughts": _key_pattern("thoughts")}
_BARE_VALUE = re.compile(r"""[^,}\]\r\n"']*""")  # an unquoted value: up to , } ] a line end or a quote


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


# ----------------------------------------------------------------------------- thought collapse


@lru_cache(maxsize=4096)
def _whole_phrase(fact: str) -> re.Pattern:
    """``fact`` standing alone, in any case: not inside a longer word or number ("2" is not in "12")."""
    return re.compile(r"(?<!\w)%s(?!\w)" % re.escape(fact), re.IGNORECASE)


def thought_grounding(thoughts: str | None, facts) -> float:
    """Share of the state's ``facts`` that ``thoughts`` names, in [0, 1] (docs/ALGORITHM.md §4.5).

    ``facts`` are the phrases of the game's ``facts()`` at the state the answer replied to. A fact
    is named where it stands as whole words, in any case; one the state holds twice (two cards
    of value 6) must be named twice. An answer without thoughts (None) names nothing.
    """
    if not facts:
        raise ValueError("facts is empty: a game's facts() must name at least one thing its state shows")
    needed = collections.Counter(facts)
    named = sum(min(count, len(_whole_phrase(fact).findall(thoughts or ""))) for fact, count in needed.items())
    return named / len(facts)


def thought_diversity(thoughts, states) -> float:
    """Share of the pairs of answers to different states whose thoughts differ (docs/ALGORITHM.md §4.5).

    1 when no two different states got the same thought; 0 when one thought answered every state
    (the collapse GTR describes). Pairs of answers to the same state do not count, so sampling
    several thoughts for one state neither raises nor lowers it. ``thoughts``: one string per
    answer (None, no thoughts, counts as one and the same thought); ``states``: one hashable per
    answer, e.g. its facts as a tuple. NaN when every answer replied to the same state.
    """
    if len(thoughts) != len(states):
        raise ValueError(f"{len(thoughts)} thoughts but {len(states)} states: pass one state per answer")

    def pairs_alike(keys):  # pairs of answers whose keys are equal
        return sum(n * (n - 1) // 2 for n in collections.Counter(keys).values())

    different_states = len(states) * (len(states) - 1) // 2 - pairs_alike(states)
    if different_states == 0:
        return float("nan")
    same_thought_different_state = pairs_alike(thoughts) - pairs_alike(zip(thoughts, states))
    return 1.0 - same_thought_different_state / different_states


# ----------------------------------------------------------------------------- base env


class VisualTextEnv(gym.Env):
    """What every game here shares: an RGB observation of ``image_size`` pixels, the
    ``rgb_array`` render mode, the ``actions`` strings and ``parse``.

    Subclasses set ``actions`` and implement ``_draw(image)`` (a white RGB Pillow image) and
    ``facts()``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    actions: list[str] = []
    action_count: int | None = None  # the action space's size when not len(actions) (ALFWorld's growing vocabulary)

    def __init__(self, image_size: int = 300, render_mode: str | None = None):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size must be an integer >= 32 (pixels), got {image_size!r}.")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}.")
        self.image_size = image_size
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(self.action_count or len(self.actions))

    def parse(self, text: str) -> int | None:
        """Action id named in a model's answer, or None (see ``parse_action``)."""
        return parse_action(text, self.actions)

    def facts(self) -> list[str]:
        """The phrases a thought grounded in the current state names (docs/ALGORITHM.md §4.5): what
        the picture shows, in the words of the game's expert, whose thoughts name them all."""
        raise NotImplementedError

    def render(self):
        """The current frame as an RGB array in ``rgb_array`` mode (None without a render mode)."""
        return self._observation() if self.render_mode == "rgb_array" else None

    def _observation(self) -> np.ndarray:
        image = Image.new("RGB", (self.image_size, self.image_size), WHITE)
        self._draw(image)
        return np.asarray(image, dtype=np.uint8)

    def _draw(self, image: Image.Image) -> None:
        raise NotImplementedError

    def _check_action(self, action) -> int:
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an id in 0..{len(self.actions) - 1}, got {action!r}.")
        return int(action)

    def _admissible_text(self) -> str:
        return "Admissible actions: " + ", ".join(f'"{a}"' for a in self.actions) + "."
