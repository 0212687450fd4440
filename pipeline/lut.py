""".cube 3D LUTs as looks: checked line by line (an error names the line), read and applied with
colour-science.

What a .cube file can say (Adobe's Cube LUT Specification 1.0, and Resolve's variant): `TITLE "…"`,
`LUT_3D_SIZE N`, `DOMAIN_MIN r g b` / `DOMAIN_MAX r g b` (Resolve: `LUT_3D_INPUT_RANGE lo hi`), `#`
comments, then N³ lines of `r g b` with red changing fastest. It has no word for the interpolation: the
spec leaves it to the application (Resolve uses tetrahedral). So a registered LUT carries its
interpolation (`tetrahedral` by default, or `trilinear`), applied with colour's
`table_interpolation_tetrahedral` / `table_interpolation_trilinear`. 1D LUTs (`LUT_1D_SIZE`) are not
looks and are refused.

The format's rules, checked here (a file that broke them could turn every frame white):
- numbers are plain ASCII decimals (`-0.5`, `1e-3`, `+.25`): Python's float() would also read `１`, `٣`,
  `1_0`, `nan` and `inf`, which no .cube writer produces;
- LUT_3D_SIZE 2–65 (the spec allows up to 256; 65³ is the largest grid colourists exchange);
- DOMAIN_MIN < DOMAIN_MAX in every channel (the spec's rule; defaults 0 0 0 and 1 1 1), and Resolve's
  LUT_3D_INPUT_RANGE low < high; domain values within ±65504, the largest half float, which is as far
  as any image file's values reach;
- table values within the domain widened by its width on each side ([-1, 2] for the default domain).
  The spec puts no bound on outputs, but a look maps the domain onto itself give or take overshoot;
  a value beyond that is a broken export, and one such corner saturates every pixel near it.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.colour_science import colour, table_interpolation_tetrahedral, table_interpolation_trilinear
from pipeline.frames import Frames

Interpolation = Literal["tetrahedral", "trilinear"]
INTERPOLATIONS: tuple[Interpolation, ...] = ("tetrahedral", "trilinear")
MIN_SIZE, MAX_SIZE = 2, 65  # 65³ is the largest grid colourists exchange (≈ 7 MB of text)
_INTERPOLATORS = {"tetrahedral": table_interpolation_tetrahedral, "trilinear": table_interpolation_trilinear}
MAX_DOMAIN = 65504.0  # the largest half float: no image file carries a value beyond it
DEFAULT_DOMAIN = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # (DOMAIN_MIN, DOMAIN_MAX) when the file gives none
CHANNELS = ("red", "green", "blue")
# an ASCII decimal as .cube writers print it; no digits of other scripts, `_`, `nan` or `inf`
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_CHUNK_FRAMES = 4  # frames per float pass: bounds memory to ~4 x 8 bytes x pixels x 3 x a few temporaries


class CubeError(ValueError):
    """A malformed .cube file; `line` is the 1-based line at fault (None: the file as a whole)."""

    def __init__(self, line: int | None, problem: str) -> None:
        super().__init__(f"line {line}: {problem}" if line is not None else problem)
        self.line = line
        self.problem = problem


def check_cube(text: str) -> int:
    """The LUT_3D_SIZE of a well-formed .cube text; CubeError names the first line that is wrong."""
    size: int | None = None
    num_rows = 0
    size_line = 0
    domain = [list(DEFAULT_DOMAIN[0]), list(DEFAULT_DOMAIN[1])]  # [DOMAIN_MIN, DOMAIN_MAX], per channel
    domain_line = 0  # the last line that set the domain: where an inverted one is reported
    bounds: list[tuple[float, float]] = []  # channel -> the table values it allows (known at the first row)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        values = rest.split()
        if keyword == "TITLE":
            if num_rows:
                raise CubeError(number, "TITLE must come before the table")
            if not (rest.strip().startswith('"') and rest.strip().endswith('"') and len(rest.strip()) >= 2):
                raise CubeError(number, f"TITLE must be followed by a quoted title, not {rest.strip()!r}")
        elif keyword == "LUT_1D_SIZE":
            raise CubeError(number, "a 1D LUT (LUT_1D_SIZE) is not a look; give a 3D LUT (LUT_3D_SIZE)")
        elif keyword == "LUT_3D_SIZE":
            if size is not None:
                raise CubeError(number, "LUT_3D_SIZE is given twice")
            if num_rows:
                raise CubeError(number, "LUT_3D_SIZE must come before the table")
            if len(values) != 1 or not (values[0].isascii() and values[0].isdigit()):
                raise CubeError(number, f"LUT_3D_SIZE must be one whole number, not {rest.strip()!r}")
            size, size_line = int(values[0]), number
            if not MIN_SIZE <= size <= MAX_SIZE:
                raise CubeError(number, f"LUT_3D_SIZE must be between {MIN_SIZE} and {MAX_SIZE}, not {size}")
        elif keyword in ("DOMAIN_MIN", "DOMAIN_MAX", "LUT_3D_INPUT_RANGE"):
            if num_rows:
                raise CubeError(number, f"{keyword} must come before the table")
            expected = 2 if keyword == "LUT_3D_INPUT_RANGE" else 3
            if len(values) != expected or not all(_reads_as_float(value) for value in values):
                raise CubeError(
                    number, f"{keyword} must be followed by {expected} numbers, not {rest.strip()!r}"
                )
            for value in values:
                if abs(_number(value, number)) > MAX_DOMAIN:
                    raise CubeError(
                        number,
                        f"{keyword} values must lie within ±{MAX_DOMAIN:g} (the largest half float), "
                        f"not {value}",
                    )
            parsed = [float(value) for value in values]
            if keyword == "LUT_3D_INPUT_RANGE":
                low, high = parsed
                if not low < high:
                    raise CubeError(number, f"{keyword} must go from low to high, not {low:g} to {high:g}")
                domain = [[low] * 3, [high] * 3]
            else:
                domain[0 if keyword == "DOMAIN_MIN" else 1] = parsed
            domain_line = number
        elif keyword[:1].isalpha() and keyword.isupper():
            raise CubeError(number, f"unknown keyword {keyword!r}")
        else:
            row = line.split()
            if len(row) != 3 or not all(_reads_as_float(value) for value in row):
                raise CubeError(number, f"expected a table row of three numbers (r g b), not {line[:80]!r}")
            if size is None:
                raise CubeError(number, "the table starts before LUT_3D_SIZE")
            if not bounds:
                bounds = _value_bounds(domain, domain_line)
            for value, (low, high) in zip(row, bounds, strict=True):
                if not low <= _number(value, number) <= high:
                    raise CubeError(
                        number,
                        f"table value {value} is outside {low:g} to {high:g} "
                        "(the domain widened by its width on each side)",
                    )
            num_rows += 1
            if num_rows > size**3:
                raise CubeError(number, f"more than LUT_3D_SIZE³ = {size**3} table rows")
    if size is None:
        raise CubeError(None, "no LUT_3D_SIZE line: not a 3D .cube LUT")
    _value_bounds(domain, domain_line)
    if num_rows != size**3:
        raise CubeError(
            size_line, f"LUT_3D_SIZE {size} needs {size**3} table rows but the file has {num_rows}"
        )
    return size


def _reads_as_float(text: str) -> bool:
    """Whether Python reads `text` as a float at all (the ASCII rule is _number's, with its own message)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str, line: int) -> float:
    """`text` as a float if it is written as the format writes numbers (ASCII decimal, finite)."""
    if _NUMBER.fullmatch(text) is None:
        raise CubeError(
            line,
            f"{text!r} is not a number (numbers are ASCII digits with an optional sign, point and exponent)",
        )
    return float(text)


def _value_bounds(domain: list[list[float]], line: int) -> list[tuple[float, float]]:
    """Per channel, the table values allowed: the domain widened by its width on each side. CubeError
    (naming `line`, where the domain was last set) when a channel's DOMAIN_MIN is not below its DOMAIN_MAX."""
    bounds = []
    for channel, low, high in zip(CHANNELS, *domain, strict=True):
        if not low < high:
            raise CubeError(
                line,
                f"DOMAIN_MIN must be below DOMAIN_MAX in every channel, but {channel} is {low:g} to {high:g}",
            )
        bounds.append((low - (high - low), high + (high - low)))
    return bounds


def read_cube(text: str) -> colour.LUT3D:
    """The LUT of a .cube text, read by colour-science (`colour.read_LUT`) after check_cube passed."""
    check_cube(text)
    with tempfile.TemporaryDirectory(prefix="previz-lut-") as folder:
        path = Path(folder) / "look.cube"
        path.write_text(text, encoding="utf-8")
        lut = colour.read_LUT(str(path))
    if not isinstance(lut, colour.LUT3D):  # a Resolve file with a 1D shaper reads as a LUT sequence
        raise CubeError(None, f"expected a plain 3D LUT but colour-science read a {type(lut).__name__}")
    return lut


@dataclass(frozen=True, slots=True)
class Lut:
    """A 3D LUT and how to interpolate it: a look the Grader applies."""

    table: colour.LUT3D
    interpolation: Interpolation = "tetrahedral"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"`interpolation` must be one of {', '.join(INTERPOLATIONS)} but is {self.interpolation!r}."
            )

    def apply(self, frames: Frames) -> Frames:
        """Each frame's 8-bit RGB through the LUT (display values in [0, 1]), rounded back to 8 bits."""
        interpolator = _INTERPOLATORS[self.interpolation]
        out = np.empty_like(frames.pixels)
        for start in range(0, frames.num_frames, _CHUNK_FRAMES):
            stop = min(start + _CHUNK_FRAMES, frames.num_frames)
            rgb = frames.pixels[start:stop].astype(np.float64) / 255.0
            graded = self.table.apply(rgb, interpolator=interpolator)
            out[start:stop] = (np.clip(graded, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Frames(pixels=out, fps=frames.fps)
