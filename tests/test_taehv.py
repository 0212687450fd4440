"""The fast draft decoder (TAEHV for the Wan2.1 latent space): published file format, frame count of the
full VAE, and chunked decoding equal to the reference's all-frames-at-once pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.taehv import FastDecoder, MemBlock, TAEHVDecoder, load_taehv, random_taehv, save_taehv
from pipeline.vae import VAEDecoder
from tests.test_vae import latents, preset_vae

TEST_WIDTHS = (16, 8, 8, 8)


def all_frames_at_once(net: TAEHVDecoder, z: torch.Tensor) -> torch.Tensor:
    """The reference's parallel pass (taehv.py `apply_model_with_memblocks_parallel`): every frame through
    each layer together, each MemBlock's memory being its input shifted one frame later (zeros first)."""
    x = z.permute(1, 0, 2, 3)
    for layer in net.decoder:
        if isinstance(layer, MemBlock):
            x = layer(x, F.pad(x, (0, 0, 0, 0, 0, 0, 1, 0))[: x.shape[0]])
        else:
            x = layer(x)
    return x.clamp(0, 1)[net.frames_to_trim :].permute(0, 2, 3, 1)


@pytest.mark.parametrize("num_latent_frames", [1, 2, 5])
def test_fast_decoder_gives_the_full_vae_frame_count(num_latent_frames: int) -> None:
    z = latents((16, num_latent_frames, 4, 6))
    fast = FastDecoder(random_taehv(1, TEST_WIDTHS)).decode(z, fps=16)
    full = VAEDecoder(preset_vae("tiny")).decode(z, fps=16)
    assert fast.pixels.shape == full.pixels.shape == ((num_latent_frames - 1) * 4 + 1, 32, 48, 3)


def test_chunk_by_chunk_equals_all_frames_at_once() -> None:
    net = random_taehv(2, TEST_WIDTHS)
    z = latents((16, 4, 4, 5), seed=3)
    with torch.inference_mode():
        chunked = torch.cat(list(FastDecoder(net).decode_chunks(z)))
        reference = all_frames_at_once(net, z)
    assert chunked.shape == reference.shape == (13, 32, 40, 3)
    torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-6)


def test_a_published_state_dict_round_trips(tmp_path: Path) -> None:
    net = random_taehv(4, TEST_WIDTHS)
    state = net.state_dict()
    assert {"decoder.1.weight", "decoder.3.conv.0.weight", "decoder.7.conv.weight", "decoder.22.bias"} <= set(
        state
    )
    # the published file also holds the encoder, and the reference's first TGrow with 2 frames' channels
    published = {**state, "encoder.0.weight": torch.zeros(64, 3, 3, 3)}
    published["decoder.7.conv.weight"] = torch.cat(
        [torch.randn_like(state["decoder.7.conv.weight"]), state["decoder.7.conv.weight"]]
    )
    torch.save(published, tmp_path / "taew2_1.pth")
    loaded = load_taehv(tmp_path / "taew2_1.pth")
    z = latents((16, 2, 4, 4))
    np.testing.assert_array_equal(
        FastDecoder(loaded).decode(z, fps=16).pixels, FastDecoder(net).decode(z, fps=16).pixels
    )
    save_taehv(loaded, tmp_path / "again.pth")
    again = load_taehv(tmp_path / "again.pth").decoder
    assert again[8].weight.shape == (TEST_WIDTHS[1], TEST_WIDTHS[0], 3, 3)  # widths read from the file


def test_a_file_that_is_not_taehv_is_refused(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="is not a TAEHV state dict"):
        load_taehv(tmp_path / "other.pth")


def test_one_process_drafts_take_the_fast_decoder_and_finals_the_vae(tmp_path: Path) -> None:
    from pipeline.local import LocalPipeline
    from pipeline.spec import RequestSpec
    from pipeline.taehv import fast_decoder_network
    from pipeline.weights import build_preset

    fast = FastDecoder(fast_decoder_network("builtin", "tiny"))
    calls: list[int] = []
    decode = fast.decode
    fast.decode = lambda *args, **kwargs: calls.append(1) or decode(*args, **kwargs)  # counts, then decodes
    pipeline = LocalPipeline(build_preset("tiny"), draft_decoder=fast)
    spec = RequestSpec(
        prompt="a crane over rooftops", resolution="96x64", duration=0.5, seed=3, quality="draft"
    )
    draft = pipeline.generate(spec, tmp_path / "draft.mp4")
    assert calls == [1]
    final = pipeline.generate(
        spec.model_copy(update={"quality": "final", "steps": 2, "cache": None}), tmp_path / "final.mp4"
    )
    assert calls == [1]  # a final never takes the fast decoder
    assert draft.num_frames == final.num_frames == 9
