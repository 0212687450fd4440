"""Step runners: what runs one iteration's plan on the experts' weights, on one device or on a rank group.

The engine (pipeline.denoise.engine) plans on rank 0 and hands each iteration to a runner as a `StepPlan`
with its members' GuidedInputs. The plan says everything a rank needs to run the forward as every other
rank does: the expert, the adapter set, and per member its id, whether it has an uncond row, whether its
rows skip the blocks (reusing their stored residual) and whether they keep a new residual. Rows are laid
out as forward.stack_rows lays them (every member's cond row, then the uncond rows).

`run_share` is the step's math and the only copy of it: `LocalRunner` runs it on one device for every
row; on a rank group (pipeline.denoise.parallel: `GroupRunner` on rank 0, `worker_loop` on the others)
every rank runs it on its CFG half's rows, with Ulysses cutting the tokens inside the model.

Each rank holds, per expert it serves, a `Holding`: the transformer, the same adapter bank on every rank
(loaded before the model is sharded), and a `ResidualStore` {(request id, row kind): residual} with the
rank's token shard of every caching row it ran. The engine releases a request's residuals
(`release`) when it finishes, is cancelled or fails; the runner drops them on every rank.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from diffusers import WanTransformer3DModel

from pipeline.denoise.adapters import AdapterBank
from pipeline.denoise.batching import AdapterSet
from pipeline.denoise.blocks import SplitTransformer
from pipeline.denoise.forward import GuidedInput, Rows, apply_guidance, stack_rows

RowKind = Literal["cond", "uncond"]
RowKey = tuple[str, RowKind]  # (request id, which of its rows): where a row's residual is stored


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One member of a step plan: what every rank must know about its rows."""

    request_id: str
    guided: bool  # it has an uncond row (CFG) as well as its cond row
    reuse: bool = False  # its rows skip the blocks: block input + the residual each rank stored for it
    keep: bool = False  # its rows run the blocks and every rank stores their new residual (it caches)

    def __post_init__(self) -> None:
        if self.reuse and self.keep:
            raise ValueError(f"request {self.request_id!r}: a step reuses its residual or keeps a new one.")


@dataclass(frozen=True, slots=True)
class PlannedRow:
    """One row of the forward, as `StepPlan.rows` lays them out."""

    key: RowKey
    reuse: bool
    keep: bool


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One iteration's forward, as every rank runs it; small and picklable (it is broadcast)."""

    expert: str  # "high" or "low": which of the runner's experts runs it
    adapters: AdapterSet  # sorted (name, weight) pairs every rank activates first; () = base weights
    members: tuple[PlannedRequest, ...]  # aligned with the GuidedInputs handed to `run`

    @classmethod
    def plain(cls, expert: str, inputs: Sequence[GuidedInput], adapters: AdapterSet = ()) -> StepPlan:
        """A plan for a forward outside the engine (warm-up, benchmarks): no caching, made-up ids."""
        members = tuple(PlannedRequest(f"row{i}", item.uncond is not None) for i, item in enumerate(inputs))
        return cls(expert=expert, adapters=adapters, members=members)

    def rows(self) -> list[PlannedRow]:
        """The forward's rows in forward.stack_rows order: cond rows, then the guided members' uncond."""
        conds = [PlannedRow((m.request_id, "cond"), m.reuse, m.keep) for m in self.members]
        unconds = [PlannedRow((m.request_id, "uncond"), m.reuse, m.keep) for m in self.members if m.guided]
        return conds + unconds

    @property
    def num_rows(self) -> int:
        return sum(1 + member.guided for member in self.members)

    @property
    def num_computed_rows(self) -> int:
        """Rows that go through the blocks (a reusing member's rows do not)."""
        return sum(1 + member.guided for member in self.members if not member.reuse)


class ResidualStore:
    """One rank's residuals of one expert: row key -> (tokens on this rank, inner_dim) tensor."""

    def __init__(self) -> None:
        self.residuals: dict[RowKey, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.residuals)

    def get(self, key: RowKey) -> torch.Tensor:
        residual = self.residuals.get(key)
        if residual is None:
            raise KeyError(f"no residual is stored for request {key[0]!r} ({key[1]} row) on this rank.")
        return residual

    def put(self, key: RowKey, residual: torch.Tensor) -> None:
        self.residuals[key] = residual  # the previous one of this row (if any) is freed here

    def release(self, request_ids: Collection[str]) -> int:
        """Drop every row of these requests; returns how many residuals went."""
        keys = [key for key in self.residuals if key[0] in request_ids]
        for key in keys:
            del self.residuals[key]
        return len(keys)

    def request_ids(self) -> set[str]:
        return {request_id for request_id, _ in self.residuals}

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.residuals.values())


@dataclass(slots=True)
class Holding:
    """One expert as one rank holds it: weights, adapters and the residuals of its caching rows."""

    transformer: WanTransformer3DModel  # this rank's copy (sharded by the group when it has Ulysses)
    bank: AdapterBank | None = None  # the same adapters on every rank; None: base weights only
    store: ResidualStore = field(default_factory=ResidualStore)
    split: SplitTransformer = field(init=False)
    num_rows: int = 0  # rows this rank ran through the blocks
    num_reused_rows: int = 0  # rows this rank served from its residual store instead

    def __post_init__(self) -> None:
        self.split = SplitTransformer(self.transformer)


def run_share(holding: Holding, plan: StepPlan, rows: Rows, mine: Sequence[int]) -> torch.Tensor:
    """One rank's share of a step, the same on every rank: the plan's rows at indices `mine` (all of them
    on one device; a CFG half's on a group), given as `rows`, with the plan's adapters active. Reusing rows
    take block input + their stored residual, keeping rows store their new one; returns the predictions
    of `rows`, in order."""
    if holding.bank is not None:
        holding.bank.activate(plan.adapters)
    elif plan.adapters:
        raise ValueError(f"the {plan.expert} expert holds no adapters but the plan needs {plan.adapters!r}.")
    planned = plan.rows()
    entries = [planned[index] for index in mine]
    reuse = [holding.store.get(entry.key) if entry.reuse else None for entry in entries]
    prediction, residuals = holding.split.cached(rows, reuse, [entry.keep for entry in entries])
    for entry, residual in zip(entries, residuals, strict=True):
        if residual is not None:
            holding.store.put(entry.key, residual)
    num_reused = sum(entry.reuse for entry in entries)
    holding.num_reused_rows += num_reused
    holding.num_rows += len(entries) - num_reused
    return prediction


class StepRunner(Protocol):
    """Runs step plans for the experts it holds (one device, or rank 0 of a rank group)."""

    def holding(self, expert: str) -> Holding:
        """Rank 0's (this process's) holding of `expert`; ValueError when it holds none."""
        ...

    def run(self, plan: StepPlan, inputs: Sequence[GuidedInput]) -> list[torch.Tensor]:
        """One guided noise prediction per member (float32 on rank 0's device)."""
        ...

    def release(self, request_ids: Collection[str], expert: str | None = None) -> None:
        """Drop these requests' residuals of `expert` (None: of every expert) on every rank."""
        ...


class LocalRunner:
    """Every row on this process's device."""

    def __init__(self, holdings: Mapping[str, Holding]) -> None:
        self.holdings = dict(holdings)  # expert -> what this process holds of it

    def holding(self, expert: str) -> Holding:
        return holding_of(self.holdings, expert)

    def run(self, plan: StepPlan, inputs: Sequence[GuidedInput]) -> list[torch.Tensor]:
        holding = self.holding(plan.expert)
        check_inputs(plan, inputs)
        rows = stack_rows(inputs, holding.transformer.dtype)
        return apply_guidance(inputs, run_share(holding, plan, rows, range(rows.num_rows)))

    def release(self, request_ids: Collection[str], expert: str | None = None) -> None:
        for name in experts_named(self.holdings, expert):
            self.holdings[name].store.release(set(request_ids))


def plain_forward(runner: StepRunner, expert: str):
    """A `Forward` (inputs -> guided noise) through `runner` on base weights, no caching (warm-up)."""
    return lambda inputs: runner.run(StepPlan.plain(expert, inputs), inputs)


def holding_of(holdings: Mapping[str, Holding], expert: str) -> Holding:
    holding = holdings.get(expert)
    if holding is None:
        held = ", ".join(holdings) or "none"
        raise ValueError(f"this runner holds no {expert} expert (it holds {held}).")
    return holding


def experts_named(holdings: Mapping[str, Holding], expert: str | None) -> Iterable[str]:
    return list(holdings) if expert is None else [expert] if expert in holdings else []


def check_inputs(plan: StepPlan, inputs: Sequence[GuidedInput]) -> None:
    guided = [item.uncond is not None for item in inputs]
    if guided != [member.guided for member in plan.members]:
        raise ValueError(
            f"the plan's {len(plan.members)} members do not match the {len(inputs)} inputs "
            "(one per member, an uncond row exactly where the member is guided)."
        )
