"""AdapterBank: the LoRA adapters loaded into one expert, and which set of them is active.

A replica loads its adapters once (at most `max_adapters`); a request names the set it runs with
(`AdapterSet`: sorted (name, weight) pairs), and between two forwards the bank switches the expert to the
next batch's set with peft's `set_adapters` (weights as scales) or `disable_lora` for none. Nothing is
fused, so the base weights stay bit for bit what was loaded, and switching costs no weight copy.

Adapter layers that peft adds (lora_A / lora_B linears) are made batch-invariant like the rest of the
expert (pipeline.determinism), so a request's rows do not depend on its batch with adapters on either.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from diffusers import WanTransformer3DModel

from pipeline.determinism import make_batch_invariant
from pipeline.lora import Expert, expert_file, load_adapter
from pipeline.spec import AdapterSet

DEFAULT_MAX_ADAPTERS = 8


class AdapterError(ValueError):
    """A request names an adapter this expert does not know."""


class AdapterBank:
    """One expert's loaded adapters; `activate` is called on the thread that runs its forwards."""

    def __init__(
        self, transformer: WanTransformer3DModel, *, max_adapters: int = DEFAULT_MAX_ADAPTERS
    ) -> None:
        if max_adapters < 0:
            raise ValueError(f"`max_adapters` must be >= 0 but is {max_adapters}.")
        self.transformer = transformer
        self.max_adapters = max_adapters
        self.loaded: set[str] = set()  # adapters with weights in this expert
        self.known: set[str] = set()  # loaded ones, and those with no file for this expert (no-ops here)
        self.active: AdapterSet = ()
        self.num_switches = 0  # set changes between forwards (metrics)

    def add(self, name: str, path: Path | None) -> None:
        """Register adapter `name`: its file for this expert, or None when it has none (a no-op here)."""
        if name in self.known:
            raise ValueError(f"adapter {name!r} is already loaded.")
        if path is not None:
            if len(self.loaded) >= self.max_adapters:
                raise ValueError(
                    f"adapter {name!r} would be number {len(self.loaded) + 1} in this expert; "
                    f"`max_adapters` is {self.max_adapters}."
                )
            load_adapter(self.transformer, path, name)
            make_batch_invariant(self.transformer)  # the new lora_A / lora_B layers too
            self.loaded.add(name)
            self.transformer.disable_lora()  # loading activates it; nothing runs with it until asked
            self.active = ()
        self.known.add(name)

    def effective(self, adapters: AdapterSet) -> AdapterSet:
        """The part of a request's set that changes this expert (its batch key here); AdapterError when
        it names an adapter this expert was not given."""
        unknown = sorted({name for name, _ in adapters} - self.known)
        if unknown:
            raise AdapterError(
                f"adapter {', '.join(map(repr, unknown))} is not loaded on this replica "
                f"(it has {', '.join(sorted(self.known)) or 'none'})."
            )
        return tuple((name, weight) for name, weight in adapters if name in self.loaded)

    def activate(self, adapters: AdapterSet) -> bool:
        """Make `adapters` (an `effective` set) the ones the next forward runs with; True if it switched."""
        if adapters == self.active:
            return False
        if adapters:
            names, weights = zip(*adapters, strict=True)
            self.transformer.set_adapters(list(names), list(weights))
            self.transformer.enable_lora()
        else:
            self.transformer.disable_lora()
        self.active = adapters
        self.num_switches += 1
        return True


def adapter_label(adapters: AdapterSet) -> str:
    """How metrics and stats name a set: `base`, or `distill+style@0.8`."""
    if not adapters:
        return "base"
    return "+".join(name if weight == 1.0 else f"{name}@{weight:g}" for name, weight in adapters)


def load_bank(
    transformer: WanTransformer3DModel,
    expert: Expert,
    folders: Mapping[str, Path],
    *,
    max_adapters: int = DEFAULT_MAX_ADAPTERS,
) -> AdapterBank:
    """An expert's bank with every adapter of `folders` (name -> adapter folder) it has a file for."""
    bank = AdapterBank(transformer, max_adapters=max_adapters)
    for name, folder in folders.items():
        bank.add(name, expert_file(folder, expert))
    return bank
