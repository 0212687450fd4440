""".cube LUT looks: checked line by line, read and applied by colour-science."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.colour_science import colour, table_interpolation_tetrahedral, table_interpolation_trilinear
from pipeline.frames import Frames
from pipeline.grade import Grader
from pipeline.lut import CubeError, Lut, check_cube, read_cube


def cube_text(table: np.ndarray, title: str = "test look") -> str:
    """A .cube file of a (size, size, size, 3) table indexed [r, g, b], red changing fastest (the spec)."""
    size = table.shape[0]
    rows = [f"{r:.6f} {g:.6f} {b:.6f}" for r, g, b in table.reshape(-1, 3, order="F")]
    return "\n".join([f'TITLE "{title}"', "# made by the tests", f"LUT_3D_SIZE {size}", *rows]) + "\n"


def identity_table(size: int) -> np.ndarray:
    return colour.LUT3D.linear_table(size)


def graded_table(size: int) -> np.ndarray:
    """A look with a warm cast, a gamma bend and a channel cross-talk: far from identity, smooth."""
    x = identity_table(size)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return np.stack([r**0.8 * 0.95 + 0.05 * g, g**1.1, 0.9 * b + 0.1 * r * g], axis=-1).clip(0, 1)


def random_frames(seed: int = 0) -> Frames:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(3, 24, 32, 3), dtype=np.uint8)
    return Frames(pixels=pixels, fps=16)


@pytest.mark.parametrize("interpolation", ["tetrahedral", "trilinear"])
def test_the_identity_lut_leaves_frames_unchanged_within_rounding(interpolation: str) -> None:
    frames = random_frames()
    lut = Lut(read_cube(cube_text(identity_table(17))), interpolation)
    graded = Grader("identity", lut=lut).grade(frames, seed=0)
    difference = np.abs(graded.pixels.astype(int) - frames.pixels.astype(int))
    assert difference.max() <= 1


@pytest.mark.parametrize(
    ("interpolation", "interpolator"),
    [("tetrahedral", table_interpolation_tetrahedral), ("trilinear", table_interpolation_trilinear)],
)
def test_a_known_lut_gives_the_pixels_of_colour_sciences_own_application(
    tmp_path: Path, interpolation: str, interpolator: object
) -> None:
    text = cube_text(graded_table(9))
    path = tmp_path / "warm.cube"
    path.write_text(text)
    frames = random_frames(1)
    graded = Lut(read_cube(text), interpolation).apply(frames)
    reference = colour.read_LUT(str(path)).apply(frames.pixels / 255.0, interpolator=interpolator)
    expected = (np.clip(reference, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    assert np.array_equal(graded.pixels, expected)
    assert np.abs(graded.pixels.astype(int) - frames.pixels.astype(int)).max() > 10  # it is a look


def test_the_two_interpolations_differ_on_a_coarse_lut() -> None:
    table = read_cube(cube_text(graded_table(3)))
    frames = random_frames(2)
    assert not np.array_equal(
        Lut(table, "tetrahedral").apply(frames).pixels, Lut(table, "trilinear").apply(frames).pixels
    )


@pytest.mark.parametrize(
    ("change", "line", "problem"),
    [
        (lambda lines: lines.__setitem__(5, "0.1 0.2"), 6, "expected a table row of three numbers"),
        (lambda lines: lines.__setitem__(7, "0.1 zero 0.3"), 8, "expected a table row of three numbers"),
        (lambda lines: lines.__setitem__(2, "LUT_3D_SIZE two"), 3, "LUT_3D_SIZE must be one whole number"),
        (lambda lines: lines.__setitem__(2, "LUT_3D_SIZE 1"), 3, "between 2 and 65"),
        (lambda lines: lines.insert(4, "LUT_3D_SIZ 2"), 5, "unknown keyword 'LUT_3D_SIZ'"),
        (lambda lines: lines.pop(), 3, "needs 8 table rows but the file has 7"),
        (lambda lines: lines.append("1 1 1"), 12, "more than LUT_3D_SIZE³ = 8 table rows"),
        (lambda lines: lines.__setitem__(2, "LUT_1D_SIZE 2"), 3, "not a look"),
        (lambda lines: lines.insert(6, "DOMAIN_MIN 0 0"), 7, "DOMAIN_MIN must come before the table"),
    ],
)
def test_a_malformed_cube_is_refused_naming_its_line(change, line: int, problem: str) -> None:
    lines = cube_text(identity_table(2)).splitlines()
    change(lines)
    with pytest.raises(CubeError) as refused:
        check_cube("\n".join(lines))
    assert refused.value.line == line
    assert problem in str(refused.value) and str(refused.value).startswith(f"line {line}: ")


def test_a_well_formed_cube_with_a_domain_and_comments_is_read() -> None:
    text = cube_text(identity_table(2)).replace("# made", "DOMAIN_MIN 0 0 0\nDOMAIN_MAX 1 1 1\n# made")
    assert check_cube(text) == 2
    assert read_cube(text).size == 2
