"""Playing cards: ranks and their values, the checks of a dealt hand, and their pictures.

Concept: the four card games (docs/ALGORITHM.md §5: RL4VLM's gym_cards) deal cards of ranks
1..13 and show them face up or face down. A card is drawn as a rounded rectangle with a big rank
and a suit symbol made of simple shapes (the default font has no suit glyphs), once per rank,
suit and size, and then only pasted; a hand keeps fixed places, so a card never moves between
frames.

Use: ``paste_cards(image, [(1, "S"), (13, "H")], hand_boxes(2, (10, 10, 290, 150), 8))``.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .drawing import INK, WHITE, draw_text, largest_font_size

RANK_NAMES = {1: "A", 11: "J", 12: "Q", 13: "K"}
SUITS = ("S", "H", "D", "C")  # spades, hearts, diamonds, clubs
CARD_RATIO = 1.4  # height / width of a playing card (5:7)

RED = (200, 0, 0)  # hearts and diamonds
CARD_BACK = (40, 70, 150)


def rank_name(rank: int) -> str:
    """What a card shows: A, 2..10, J, Q, K."""
    return RANK_NAMES.get(rank, str(rank))


def card_value(rank: int) -> int:
    """The card's number in the arithmetic games and Blackjack: J, Q and K count 10, A counts 1."""
    return min(rank, 10)


def check_ranks(ranks, count_ok, what: str) -> list[int]:
    """Validate card ranks from ``reset(options=...)``; ``count_ok(n)`` says which counts are
    fine."""
    if not isinstance(ranks, (list, tuple)):
        raise ValueError(f"{what} must be a list of card ranks, got {ranks!r}; pass e.g. [1, 13].")
    if not count_ok(len(ranks)):
        raise ValueError(f"{what} has the wrong number of cards ({len(ranks)}): {list(ranks)!r}.")
    for r in ranks:
        # bool is an int subclass, but True as a card is surely a mistake.
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= 13:
            raise ValueError(f"{what} holds {r!r}; ranks are integers 1..13 "
                             "(A=1, J=11, Q=12, K=13).")
    return [int(r) for r in ranks]


def draw_suit(draw: ImageDraw.ImageDraw, suit: str, cx: float, cy: float, s: float,
              fill) -> None:
    """A suit symbol of size ``s`` centred on (cx, cy), built from circles and triangles
    (the default font has no suit glyphs)."""

    def disc(x, y, r):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)

    stem = [(cx, cy), (cx - 0.2 * s, cy + 0.5 * s), (cx + 0.2 * s, cy + 0.5 * s)]
    if suit == "D":
        draw.polygon([(cx, cy - s / 2), (cx + 0.38 * s, cy), (cx, cy + s / 2),
                      (cx - 0.38 * s, cy)], fill=fill)
    elif suit == "H":  # two lobes on top of a triangle pointing down
        disc(cx - 0.24 * s, cy - 0.2 * s, 0.26 * s)
        disc(cx + 0.24 * s, cy - 0.2 * s, 0.26 * s)
        draw.polygon([(cx - 0.49 * s, cy - 0.12 * s), (cx + 0.49 * s, cy - 0.12 * s),
                      (cx, cy + 0.5 * s)], fill=fill)
    elif suit == "S":  # an upside-down heart on a stem
        disc(cx - 0.24 * s, cy + 0.08 * s, 0.24 * s)
        disc(cx + 0.24 * s, cy + 0.08 * s, 0.24 * s)
        draw.polygon([(cx - 0.47 * s, cy + 0.02 * s), (cx + 0.47 * s, cy + 0.02 * s),
                      (cx, cy - 0.5 * s)], fill=fill)
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
        w = min((x1 - x0 - gap * (cols - 1)) / cols,
                (y1 - y0 - gap * (rows - 1)) / rows / CARD_RATIO)
        if w > best_w:
            best_w, best_cols = w, cols
    w, h = int(best_w), int(best_w * CARD_RATIO)
    return [(x0 + (i % best_cols) * (w + gap), y0 + (i // best_cols) * (h + gap), w, h)
            for i in range(n)]


def paste_cards(image: Image.Image, cards, boxes, face_up: int | None = None) -> None:
    """Paste (rank, suit) cards into ``boxes``; cards from index ``face_up`` on are face down."""
    for i, ((rank, suit), (x, y, w, h)) in enumerate(zip(cards, boxes)):
        hidden = face_up is not None and i >= face_up
        image.paste(card_back_tile(w, h) if hidden else card_tile(rank, suit, w, h), (x, y))
