"""`python -m loadtest.bench_keyframes` prints the keyframe encode and the I2V step as ratios."""

from __future__ import annotations

from loadtest.bench_keyframes import main


def test_bench_prints_the_encode_and_step_ratios_with_its_command(capsys) -> None:
    assert main(["--preset", "tiny-i2v", "--size", "64x64", "--frames", "5", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "python -m loadtest.bench_keyframes --preset tiny-i2v --size 64x64 --frames 5" in out
    ratios = {line.split()[0]: float(line.split()[-1]) for line in out.splitlines() if " / " in line}
    assert set(ratios) == {"encode", "i2v"} and all(value > 0 for value in ratios.values())
