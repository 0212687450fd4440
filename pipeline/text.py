"""TextEncoder stage: prompts → umT5 embeddings, with an LRU cache keyed by the prompt text.

Storyboards repeat the same negative prompt and often the same shot text across seeds, so the cache
saves a 5.7 B-parameter encoder forward for most requests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from pipeline._compat import prompt_clean
from pipeline.determinism import make_batch_invariant


@dataclass(frozen=True, slots=True)
class PromptEmbeds:
    """One prompt's encoder output without its padding (padding is zeros, restored by `pad_embeds`)."""

    embeds: torch.Tensor  # (num_tokens, text_dim) on CPU, num_tokens <= max_sequence_length


def pad_embeds(prompts: Sequence[PromptEmbeds], max_sequence_length: int) -> torch.Tensor:
    """Stack to (B, max_sequence_length, text_dim), zero-padded exactly as WanPipeline does."""
    first = prompts[0].embeds
    out = first.new_zeros(len(prompts), max_sequence_length, first.shape[-1])
    for row, prompt in enumerate(prompts):
        out[row, : prompt.embeds.shape[0]] = prompt.embeds
    return out


class TextEncoder:
    """Tokenize + encode prompts in one batched forward; repeated texts come from an LRU cache."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: UMT5EncoderModel,
        *,
        max_sequence_length: int = 512,
        cache_size: int = 512,
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = make_batch_invariant(text_encoder)  # a prompt's embeds do not depend on its batch
        self.max_sequence_length = max_sequence_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, PromptEmbeds] = OrderedDict()  # cleaned text -> embeds
        self.num_cache_hits = 0
        self.num_cache_misses = 0

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> list[PromptEmbeds]:
        """Embeddings for `texts`, in order; only texts not in the cache reach the encoder."""
        cleaned = [prompt_clean(text) for text in texts]
        found: dict[str, PromptEmbeds] = {}  # cleaned text -> embeds, for this call
        for text in dict.fromkeys(cleaned):
            if text in self._cache:
                self._cache.move_to_end(text)
                found[text] = self._cache[text]
        missing = [text for text in dict.fromkeys(cleaned) if text not in found]
        if missing:
            for text, embeds in zip(missing, self._encode_uncached(missing), strict=True):
                found[text] = embeds
                self._remember(text, embeds)
        self.num_cache_misses += len(missing)
        self.num_cache_hits += len(cleaned) - len(missing)
        return [found[text] for text in cleaned]

    def _encode_uncached(self, texts: list[str]) -> list[PromptEmbeds]:
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(
            tokens.input_ids.to(device), tokens.attention_mask.to(device)
        ).last_hidden_state
        lengths = tokens.attention_mask.gt(0).sum(dim=1).tolist()
        return [
            PromptEmbeds(embeds=row[:length].cpu().clone())
            for row, length in zip(hidden, lengths, strict=True)
        ]

    def _remember(self, text: str, embeds: PromptEmbeds) -> None:
        self._cache[text] = embeds
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
