"""Slates: the card before a shot in an assembly, naming the shot and the take and marking the draft."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.video import DRAFT_LABEL


def slate_frames(lines: list[str], width: int, height: int, num_frames: int) -> np.ndarray:
    """(num_frames, height, width, 3) uint8: `lines` and the draft label, white on black, centred."""
    if num_frames <= 0:
        raise ValueError(f"`num_frames` must be positive but is {num_frames}.")
    card = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(card)
    text = [*lines, DRAFT_LABEL]
    font = ImageFont.load_default(size=max(8, height // (2 * len(text) + 2)))
    boxes = [font.getbbox(line) for line in text]
    line_height = max(bottom - top for _left, top, _right, bottom in boxes) * 1.4
    top = (height - line_height * len(text)) / 2
    for index, (line, (left, box_top, right, _bottom)) in enumerate(zip(text, boxes, strict=True)):
        x = (width - (right - left)) / 2 - left
        y = top + index * line_height - box_top
        draw.text((x, y), line, font=font, fill=(255, 255, 255) if index < len(lines) else (255, 200, 0))
    return np.repeat(np.asarray(card)[None], num_frames, axis=0)
