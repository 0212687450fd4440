"""FLOPs of one Wan transformer forward, counted as in issue 13's note: matmuls only (2 per multiply-add),
per row, embeddings and the output projection left out (under 0.1 % at 480p and 720p)."""

from __future__ import annotations


def wan_forward_flops(
    num_tokens: int, *, dim: int, ffn_dim: int, num_layers: int, text_tokens: int = 512, num_rows: int = 1
) -> float:
    """FLOPs of one forward of `num_rows` rows of `num_tokens` video tokens each.

    Per layer and row, N video tokens, T text tokens, d = dim, f = ffn_dim:
      self-attention projections q, k, v, out   4 x 2 N d^2
      self-attention scores and values          2 x 2 N^2 d
      cross-attention q and out                 2 x 2 N d^2
      cross-attention k and v (text)            2 x 2 T d^2
      cross-attention scores and values         2 x 2 N T d
      feed-forward up and down                  2 x 2 N d f
    A14B at 720p/81f (N = 75,600): 6.5 PFLOP a row, 13 PFLOP a guided (CFG) step."""
    n, t, d, f = num_tokens, text_tokens, dim, ffn_dim
    per_layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * d + 4 * t * d * d + 4 * n * t * d + 4 * n * d * f
    return float(per_layer * num_layers * num_rows)
