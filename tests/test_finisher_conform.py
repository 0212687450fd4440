"""The Finisher conforms a clip to the delivered frame rate before grading and encoding it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.frames import Frames
from pipeline.interpolate import FlowInterpolator, ModelInterpolator
from pipeline.video import read_video_info
from serve.config import PrevizArgs
from serve.stages.finisher import FinisherDeployment, make_interpolator
from serve.stages.payloads import FinishCall
from serve.storage import StorageSettings


def finisher(tmp_path: Path, **fields: object):
    args = PrevizArgs(storage=StorageSettings(local_root=tmp_path / "artifacts"), **fields)
    return FinisherDeployment.func_or_class(args)


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
