"""The Finisher conforms a clip to the delivered frame rate, then grades it with its look (a LUT too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.frames import Frames
from pipeline.interpolate import FlowInterpolator, ModelInterpolator
from pipeline.video import read_video_info
from serve.config import PrevizArgs
from serve.jobs.request import LutRef
from serve.stages.finisher import FinisherStage, make_interpolator
from serve.stages.payloads import FinishCall
from serve.storage import StorageSettings
from serve.webhooks import open_job_store


def finisher(tmp_path: Path, **fields: object):
    args = PrevizArgs(storage=StorageSettings(local_root=tmp_path / "artifacts"), **fields)
    return FinisherStage(args)


def test_a_16_fps_clip_asked_at_24_is_stored_with_24_frames_a_second(tmp_path: Path) -> None:
    pixels = np.stack([np.full((64, 96, 3), 10 * i, dtype=np.uint8) for i in range(16)])
    call = FinishCall(
        project="p", job_id="vid_1", attempt=1, seed=0, look="none", label=None, metadata={}, fps=24
    )
    clip = finisher(tmp_path)._finish(Frames(pixels=pixels, fps=16), call)
    assert clip.num_frames == 24
    info = read_video_info(tmp_path / "artifacts" / clip.key)
    assert (info.num_frames, info.fps) == (24, 24.0)


def test_the_interpolator_is_the_network_when_weights_are_configured(tmp_path: Path) -> None:
    import torch

    class Mean(torch.nn.Module):
        def forward(self, img0: torch.Tensor, img1: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return (img0 + img1) / 2 + 0 * timestep

    example = (torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 32, 32))
    torch.export.save(torch.export.export(Mean(), example), str(tmp_path / "rife.pt2"))
    assert isinstance(make_interpolator(PrevizArgs()), FlowInterpolator)
    args = PrevizArgs(interpolation_weights=tmp_path / "rife.pt2", device="cpu")
    assert isinstance(make_interpolator(args), ModelInterpolator)


def test_the_finisher_grades_with_the_jobs_lut_as_colour_science_applies_it(tmp_path: Path) -> None:
    from pipeline.colour_science import colour, table_interpolation_tetrahedral
    from serve.luts import register_lut
    from tests.test_editorial_api import warm_cube

    stage = finisher(tmp_path)
    store = open_job_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    store.create_project("p")
    record, _ = register_lut(store, stage.store, "p", "warm", warm_cube())
    ref = LutRef(key=record.key, sha256=record.sha256, interpolation="tetrahedral")
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 64, 96, 3), dtype=np.uint8)
    call = FinishCall(
        project="p", job_id="vid_2", attempt=1, seed=0, look="warm", label=None, metadata={}, lut=ref
    )
    graded = stage.finisher.grade(Frames(pixels=pixels, fps=16), stage.how_to_finish(call))
    (tmp_path / "warm.cube").write_text(warm_cube())
    reference = colour.read_LUT(str(tmp_path / "warm.cube")).apply(
        pixels / 255.0, interpolator=table_interpolation_tetrahedral
    )
    assert np.array_equal(graded.pixels, (np.clip(reference, 0, 1) * 255 + 0.5).astype(np.uint8))
    clip = stage._finish(Frames(pixels=pixels, fps=16), call)
    assert read_video_info(tmp_path / "artifacts" / clip.key).num_frames == 3
    store.close()


def test_luts_named_in_the_config_are_registered_when_the_ingress_starts(tmp_path: Path) -> None:
    from tests.support.api_app import local_api
    from tests.test_editorial_api import warm_cube

    (tmp_path / "warm.cube").write_text(warm_cube())
    source = {"project": "dune", "name": "warm", "source": str(tmp_path / "warm.cube")}
    with local_api(tmp_path, luts=[source]) as api:
        record = api.store.get_lut("dune", "warm")
        assert record is not None and record.size == 3


def test_the_app_config_with_its_lut_sources_loads_without_the_job_store() -> None:
    """config.py holds the LUT source type itself, so reading a config imports no store (no config ->
    luts -> store chain)."""
    code = (
        "import sys; from serve.config import LutSource, PrevizArgs; "
        "PrevizArgs(luts=[LutSource(project='dune', name='warm', source='warm.cube')]); "
        "print(sorted(name for name in sys.modules if name.startswith(('serve.jobs', 'serve.luts'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
