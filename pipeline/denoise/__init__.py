"""Denoising: per-request solver state, the single-request Denoiser and (later) the batching engine."""

from pipeline.denoise.denoiser import Denoiser, expert_for
from pipeline.denoise.state import DenoiseState, initial_state

__all__ = ["DenoiseState", "Denoiser", "expert_for", "initial_state"]
