"""A fast draft decoder: TAEHV's tiny decoder for the Wan2.1 latent space (`taew2_1.pth`), which
Wan2.2-A14B shares (16 channels, stride 4 x 8 x 8).

No package on PyPI loads TAEHV, so its decoder is written here by hand from the reference
(github.com/madebyollin/taehv, taehv.py: `TAEHV.decoder`, `MemBlock`, `TGrow`, `Clamp`), read and
rewritten, not copied: the layer order and module indices match the reference's `nn.Sequential`, so a
published `.pth` state dict (keys `decoder.<index>...`) loads as it is; its `encoder.*` keys are ignored.

What it keeps of the reference's conventions:
- it decodes the latents the DiT makes as they are (no latents_mean/std), to RGB in [0, 1];
- each latent frame grows to 4 frames (two temporal x2 stages), and the first 3 frames are trimmed, so
  T latent frames give 4(T-1)+1 frames: the count the full Wan VAE gives;
- it is causal in time: a `MemBlock` sees its input frame and the one before it at its own level (zeros
  before the first), so decoding latent frame by latent frame with that one frame carried per block
  equals the reference's all-frames-at-once (`parallel=True`) pass while holding one chunk's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.frames import Frames
from pipeline.vae import fill_clip, num_video_frames

# Wan2.1's TAEHV: decoder widths per level, temporal upscale per level (the first level keeps time).
WIDTHS = (256, 128, 64, 64)
TIME_UPSCALE = (False, True, True)
LATENT_CHANNELS = 16


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to about ±3 (tanh), as TAEHV's decoder starts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """A residual block that also sees the previous frame's input at this level (its memory)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in * 2, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    """Temporal upscale: a 1x1 conv makes `stride` frames' channels out of each frame, in time order."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, channels, height, width = x.shape
        return self.conv(x).reshape(frames * self.stride, channels, height, width)


class TAEHVDecoder(nn.Module):
    """TAEHV's decoder network; `decoder` holds the layers at the reference's indices."""

    def __init__(
        self,
        latent_channels: int = LATENT_CHANNELS,
        widths: Sequence[int] = WIDTHS,
        time_upscale: Sequence[bool] = TIME_UPSCALE,
        patch_size: int = 1,
    ) -> None:
        super().__init__()
        self.latent_channels, self.patch_size = latent_channels, patch_size
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, widths[0]), nn.ReLU()]
        for level, grow in enumerate(time_upscale):
            width, next_width = widths[level], widths[level + 1]
            layers += [MemBlock(width, width) for _ in range(3)]
            layers += [nn.Upsample(scale_factor=2), TGrow(width, 2 if grow else 1)]
            layers.append(_conv(width, next_width, bias=False))
        layers += [nn.ReLU(), _conv(widths[-1], 3 * patch_size**2)]
        self.decoder = nn.Sequential(*layers)
        self.temporal_stride = 2 ** sum(time_upscale)
        self.frames_to_trim = self.temporal_stride - 1  # aligns the first frame with the full VAE's

    def forward_chunk(self, latents: torch.Tensor, memory: list[torch.Tensor | None]) -> torch.Tensor:
        """(frames, channels, height, width) latents → RGB frames in [0, 1], `frames * temporal_stride` of
        them; `memory` (one slot per layer, None at the start) carries each MemBlock's last input frame from
        the previous chunk and is updated in place."""
        x = latents
        for index, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                carried = memory[index]
                first = torch.zeros_like(x[:1]) if carried is None else carried
                past = torch.cat([first, x[:-1]])
                memory[index] = x[-1:]
                x = layer(x, past)
            else:
                x = layer(x)
        if self.patch_size > 1:
            x = F.pixel_shuffle(x, self.patch_size)
        return x.clamp(0, 1)


def load_taehv(path: Path, device: torch.device | str = "cpu") -> TAEHVDecoder:
    """A TAEHV decoder from a published `.pth` state dict (or its safetensors conversion): the widths, latent
    channels and patch size are read from the tensors' shapes; a TGrow saved with more frames than the
    decoder uses keeps the last ones, as the reference does."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    decoder_state = {key: value for key, value in state.items() if key.startswith("decoder.")}
    if "decoder.1.weight" not in decoder_state:
        raise ValueError(f"{path} is not a TAEHV state dict: it has no `decoder.1.weight`.")
    first = decoder_state["decoder.1.weight"]  # conv(latent channels -> widths[0])
    widths = (first.shape[0], *(decoder_state[f"decoder.{i}.weight"].shape[0] for i in (8, 14, 20)))
    last = decoder_state["decoder.22.weight"]
    patch_size = round((last.shape[0] / 3) ** 0.5)
    net = TAEHVDecoder(latent_channels=first.shape[1], widths=widths, patch_size=patch_size)
    wanted = net.state_dict()
    for key, value in decoder_state.items():
        if (
            key in wanted
            and value.shape[0] > wanted[key].shape[0]
            and value.shape[1:] == wanted[key].shape[1:]
        ):
            decoder_state[key] = value[-wanted[key].shape[0] :]
    net.load_state_dict(decoder_state)
    return net.to(device).eval().requires_grad_(False)


def save_taehv(net: TAEHVDecoder, path: Path) -> Path:
    """Write `net` in the published format (a torch state dict with the reference's `decoder.*` keys)."""
    torch.save(net.state_dict(), path)
    return path


def random_taehv(seed: int, widths: Sequence[int]) -> TAEHVDecoder:
    """A seeded random-weight TAEHV decoder for the presets (no published weights here)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TAEHVDecoder(widths=widths).eval().requires_grad_(False)


class FastDecoder:
    """Decode one request's latents with TAEHV: the same contract as `VAEDecoder.decode` (uint8 frames
    made on the device, one copy to the host, the full VAE's frame count), for the draft tier only."""

    def __init__(self, net: TAEHVDecoder, *, dtype: torch.dtype = torch.float32) -> None:
        self.net = net.to(dtype=dtype)
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.inference_mode()
    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Float frames in [0, 1], (frames, height, width, 3) float32 on the device, one latent frame at a
        time; `latents` is (channels, latent_frames, latent_height, latent_width) as the DiT makes them."""
        z = latents.to(self.device, self.dtype).permute(1, 0, 2, 3)  # (frames, channels, height, width)
        memory: list[torch.Tensor | None] = [None] * len(self.net.decoder)
        for index in range(z.shape[0]):
            frames = self.net.forward_chunk(z[index : index + 1], memory)
            if index == 0:
                frames = frames[self.net.frames_to_trim :]
            yield frames.float().permute(0, 2, 3, 1)

    @torch.inference_mode()
    def decode(
        self, latents: torch.Tensor, *, fps: int, progress: Callable[[int, int], None] | None = None
    ) -> Frames:
        """The whole clip as uint8 frames."""
        _, num_latent_frames, latent_height, latent_width = latents.shape
        scale = 8 * self.net.patch_size  # three x2 upsamples, then the pixel shuffle
        clip = torch.empty(
            (
                num_video_frames(num_latent_frames, self.net.temporal_stride),
                latent_height * scale,
                latent_width * scale,
                3,
            ),
            dtype=torch.uint8,
            device=self.device,
        )
        pixels = fill_clip(clip, self.decode_chunks(latents), num_latent_frames, progress)
        return Frames(pixels=pixels, fps=fps)


def fast_decoder_network(weights: str, source: str, device: torch.device | str = "cpu") -> TAEHVDecoder:
    """The draft decoder a deployment configures: `builtin` gives a preset's seeded random weights (the
    presets have no published TAEHV), anything else is a local `.pth`/`.safetensors` file (taew2_1)."""
    from pipeline.lora import BUILTIN
    from pipeline.weights import PRESETS

    if weights == BUILTIN:
        if source not in PRESETS:
            raise ValueError(
                f"`decoder.fast_weights: {BUILTIN}` exists for the presets ({', '.join(PRESETS)}) only; "
                f"model {source!r} needs TAEHV's published taew2_1.pth."
            )
        preset = PRESETS[source]
        return random_taehv(preset.seed + 1, preset.fast_decoder_widths).to(device)
    return load_taehv(Path(weights), device)
