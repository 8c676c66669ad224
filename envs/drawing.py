"""Drawing the pictures with Pillow alone: colours, the font and bold text.

Concept: every observation here is an RGB picture (docs/ALGORITHM.md §5), drawn with Pillow's
built-in scalable font, so no font or image file is read and nothing depends on the working
directory (a weak point of the reference, docs/ALGORITHM.md §6). Text is drawn bold, so that it
survives the downscaling a small model's vision encoder applies. The playing cards are drawn in
cards.py on top of this.

Use: ``draw_text(image, (150, 150), "target 4", 40, center=True)``.
"""
from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

WHITE = (255, 255, 255)
INK = (20, 20, 20)  # near-black: text, card outlines, black suits


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
    ImageDraw.Draw(mask).text((-left, -top), text, font=f, fill=255, stroke_width=sw,
                              stroke_fill=255)
    return mask, left, top


def draw_text(image: Image.Image, xy, text: str, size: int, fill=INK,
              center: bool = False) -> None:
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


def wrap_words(words: list[str], size: int, max_w: float) -> list[str]:
    """Greedy line wrapping of ``words`` (joined by spaces) for the bold font at ``size``."""
    f, lines = font(size), []
    for word in words:
        if lines and f.getlength(lines[-1] + " " + word) + 2 * stroke(size) <= max_w:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines
