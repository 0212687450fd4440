""".cube LUT looks: checked line by line, read and applied by colour-science."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.colour_science import colour, table_interpolation_tetrahedral, table_interpolation_trilinear
from pipeline.frames import Frames
from pipeline.grade import Grader
from pipeline.lut import CubeError, Lut, check_cube, read_cube
from tests.support.api_app import local_api


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


# -- the format's rules: domains, value range, ASCII numbers (a file that breaks them turned frames white)


def two_point_cube(header: list[str], rows: list[str] | None = None) -> str:
    """A 2³ identity .cube with `header` lines after LUT_3D_SIZE (line 2), then its eight rows (or `rows`)."""
    table = [f"{r:.1f} {g:.1f} {b:.1f}" for b in (0, 1) for g in (0, 1) for r in (0, 1)]
    return "\n".join(["LUT_3D_SIZE 2", *header, *(rows if rows is not None else table)]) + "\n"


def with_row(index: int, row: str) -> list[str]:
    """The identity rows of a 2³ cube with row `index` replaced."""
    rows = [f"{r:.1f} {g:.1f} {b:.1f}" for b in (0, 1) for g in (0, 1) for r in (0, 1)]
    rows[index] = row
    return rows


NOT_ASCII = "is not a number (numbers are ASCII digits with an optional sign, point and exponent)"
WIDENED = "(the domain widened by its width on each side)"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        pytest.param(
            two_point_cube(["DOMAIN_MIN 0 0 0", "DOMAIN_MAX 1 0 1"]),
            3,
            "DOMAIN_MIN must be below DOMAIN_MAX in every channel, but green is 0 to 0",
            id="degenerate domain",
        ),
        pytest.param(
            two_point_cube(["DOMAIN_MAX 1 1 1", "DOMAIN_MIN 0 0 2"]),
            3,
            "DOMAIN_MIN must be below DOMAIN_MAX in every channel, but blue is 2 to 1",
            id="inverted domain",
        ),
        pytest.param(
            two_point_cube(["LUT_3D_INPUT_RANGE 1 0"]),
            2,
            "LUT_3D_INPUT_RANGE must go from low to high, not 1 to 0",
            id="inverted input range",
        ),
        pytest.param(
            two_point_cube(["DOMAIN_MAX 1 1 1e300"]),
            2,
            "DOMAIN_MAX values must lie within ±65504 (the largest half float), not 1e300",
            id="absurd domain",
        ),
        pytest.param(
            two_point_cube([], with_row(3, "1.0 1e30 0.0")),
            5,
            f"table value 1e30 is outside -1 to 2 {WIDENED}",
            id="absurd value",
        ),
        pytest.param(
            two_point_cube(["DOMAIN_MIN -0.5 -0.5 -0.5", "DOMAIN_MAX 1.5 1.5 1.5"], with_row(0, "0 0 -2.6")),
            4,
            f"table value -2.6 is outside -2.5 to 3.5 {WIDENED}",
            id="value outside a wider domain",
        ),
        pytest.param(two_point_cube([], with_row(7, "1 1 nan")), 9, f"'nan' {NOT_ASCII}", id="nan"),
        pytest.param(two_point_cube([], with_row(2, "0 inf 0")), 4, f"'inf' {NOT_ASCII}", id="inf"),
        # float() reads every one of these: fullwidth one, Arabic-Indic three, an underscore separator
        pytest.param(two_point_cube([], with_row(1, "１ 0 0")), 3, f"'１' {NOT_ASCII}", id="fullwidth digit"),
        pytest.param(
            two_point_cube([], with_row(4, "0 0 ٣")), 6, f"'٣' {NOT_ASCII}", id="arabic-indic digit"
        ),
        pytest.param(two_point_cube(["DOMAIN_MAX 1 1 １"]), 2, f"'１' {NOT_ASCII}", id="fullwidth in domain"),
        pytest.param(two_point_cube([], with_row(5, "1_0 0 0")), 7, f"'1_0' {NOT_ASCII}", id="underscore"),
    ],
)
def test_a_cube_breaking_the_formats_rules_is_refused_naming_its_line(
    text: str, line: int, message: str
) -> None:
    with pytest.raises(CubeError) as refused:
        check_cube(text)
    assert str(refused.value) == f"line {line}: {message}"


@pytest.mark.parametrize("size", ["２", "²"])  # str.isdigit() is true for both; int("²") raises ValueError
def test_a_lut_size_in_other_than_ascii_digits_is_refused_naming_its_line(size: str) -> None:
    with pytest.raises(CubeError) as refused:
        check_cube(two_point_cube([]).replace("LUT_3D_SIZE 2", f"LUT_3D_SIZE {size}"))
    assert str(refused.value) == f"line 1: LUT_3D_SIZE must be one whole number, not {size!r}"


def test_values_slightly_outside_the_domain_and_an_extended_domain_are_read() -> None:
    overshoot = two_point_cube(["DOMAIN_MIN -0.25 0 0", "DOMAIN_MAX 1.25 1 1"], with_row(7, "1.02 1 -0.04"))
    assert check_cube(overshoot) == 2
    assert read_cube(overshoot).size == 2
    assert check_cube(two_point_cube(["LUT_3D_INPUT_RANGE -0.5 1.5"], with_row(0, "+.5e-1 -0 1E0"))) == 2


def test_the_admin_upload_refuses_a_lut_breaking_the_formats_rules_with_invalid_lut(tmp_path: Path) -> None:
    with local_api(tmp_path) as api:
        cube = two_point_cube(["DOMAIN_MIN 0 0 0", "DOMAIN_MAX 1 1 ٣"])
        answer = api.client.put("/v1/admin/projects/default/luts/warm", json={"cube": cube})
        assert answer.status_code == 400
        assert answer.json()["error"] == {
            "code": "invalid_lut",
            "param": "cube",
            "message": f"the .cube file is malformed: line 3: '٣' {NOT_ASCII}",
        }
        assert api.store.get_lut("default", "warm") is None
