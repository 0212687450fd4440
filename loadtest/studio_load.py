"""A studio's load on a running Previz: projects sending interactive shots and batch storyboards.

    python -m loadtest.studio_load --url http://127.0.0.1:8000 --admin-key pvz_… \\
        --projects 4 --rate 120 --max-shots 40 --max-seconds 600 --json run.json
    python -m loadtest.predict_run run.json                 # what the simulator predicts for that run

A bounded asyncio client (httpx) rather than locust: the arrivals must be one exact Poisson trace for a
seed (the simulator replays the same trace), every video is followed on its own server-sent event stream
(time to first progress), and a run is one JSON; locust's users loop on wait times and know no SSE.

Per arrival (Poisson at `--rate` shots an hour, until `--max-shots` or `--max-seconds`), from a random
project: an interactive single shot (`--interactive-share`) or a batch storyboard of `--board-shots` x
`--board-variants` videos. Tiers: `quality: draft | final` where the server offers it (its OpenAPI
says), otherwise their step counts (`--draft-steps`, `--final-steps`). Each video is followed until it
ends. Measured per class (and per project): time to the first progress event (the job left the queue),
time to done (p50/p95/p99), 429s, throughput, and Jain's fairness index over the projects' service
rates (shots per second of time in the system). Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.capacity import summary

PROMPTS = (
    "a man in a black trench coat leaps from a tower, flips twice, lands; explosion behind",
    "two fencers cross blades on a rooftop at dusk, slow motion",
    "a chase through a night market, handheld camera",
    "a lighthouse in a storm, waves breaking over the rail",
)


@dataclass(frozen=True)
class LoadPlan:
    projects: int = 4
    rate_per_hour: float = 120.0
    max_shots: int = 40
    max_seconds: float = 600.0
    interactive_share: float = 0.7
    board_shots: int = 2
    board_variants: int = 2
    draft_share: float = 1.0  # of interactive shots; batch shots are final
    size: str = "96x64"
    seconds: float = 0.5
    draft_steps: int = 2
    final_steps: int = 6
    seed: int = 0


@dataclass
class VideoRecord:
    """One video of the run; times in seconds from the run's start."""

    id: str
    project: str
    klass: str
    tier: str
    arrival_s: float
    first_progress_s: float | None = None
    done_s: float | None = None
    status: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Arrival:
    at_s: float
    project: str
    klass: str
    tier: str


def arrivals(plan: LoadPlan) -> list[Arrival]:
    """The run's Poisson trace: the same for the same seed."""
    rng = random.Random(plan.seed)
    trace, t = [], 0.0
    while len(trace) < plan.max_shots:
        t += rng.expovariate(plan.rate_per_hour / 3600)
        if t > plan.max_seconds:
            break
        klass = "interactive" if rng.random() < plan.interactive_share else "batch"
        tier = "draft" if klass == "interactive" and rng.random() < plan.draft_share else "final"
        trace.append(Arrival(t, f"load-{rng.randrange(plan.projects)}", klass, tier))
    return trace


class StudioLoad:
    def __init__(self, url: str, admin_key: str, plan: LoadPlan) -> None:
        self.url, self.admin_key, self.plan = url.rstrip("/"), admin_key, plan
        self.records: list[VideoRecord] = []
        self.rejected: dict[str, int] = defaultdict(int)  # class -> 429s
        self.errors: list[str] = []
        self.start = 0.0
        self.tiers_offered = False

    def now(self) -> float:
        return time.monotonic() - self.start

    async def keys(self, client: httpx.AsyncClient) -> dict[str, str]:
        """A member key for each load project (created when new)."""
        admin = {"Authorization": f"Bearer {self.admin_key}"}
        keys = {}
        for index in range(self.plan.projects):
            project = f"load-{index}"
            created = await client.post("/v1/admin/projects", json={"name": project}, headers=admin)
            if created.status_code not in (201, 409):
                raise RuntimeError(f"creating project {project}: {created.status_code} {created.text[:200]}")
            key = await client.post(
                f"/v1/admin/projects/{project}/keys", json={"role": "member"}, headers=admin
            )
            key.raise_for_status()
            keys[project] = key.json()["key"]
        return keys

    def settings(self, tier: str) -> dict[str, Any]:
        fields: dict[str, Any] = {"size": self.plan.size, "seconds": str(self.plan.seconds)}
        if self.tiers_offered:
            fields["quality"] = tier
        else:
            fields["steps"] = self.plan.draft_steps if tier == "draft" else self.plan.final_steps
        return fields

    async def submit(self, client: httpx.AsyncClient, key: str, arrival: Arrival, index: int) -> list[str]:
        headers = {"Authorization": f"Bearer {key}"}
        prompt = PROMPTS[index % len(PROMPTS)]
        if arrival.klass == "interactive":
            body = {"prompt": prompt, "priority": "interactive", "seed": index, **self.settings(arrival.tier)}
            response = await client.post("/v1/videos", json=body, headers=headers)
            if response.status_code == 429:
                self.rejected[arrival.klass] += 1
                return []
            response.raise_for_status()
            return [response.json()["id"]]
        settings = self.settings(arrival.tier)
        shots = [
            {"name": f"{index}-{n}", "prompt": f"{prompt}, shot {n}", **settings}
            for n in range(self.plan.board_shots)
        ]
        body = {
            "title": f"board {index}",
            "priority": "batch",
            "shots": shots,
            "variants": {"seeds": self.plan.board_variants},
        }
        response = await client.post("/v1/storyboards", json=body, headers=headers)
        if response.status_code == 429:
            self.rejected[arrival.klass] += 1
            return []
        response.raise_for_status()
        return [video["video_id"] for shot in response.json()["shots"] for video in shot["videos"]]

    async def follow(self, client: httpx.AsyncClient, key: str, record: VideoRecord) -> None:
        """Read the video's event stream until `done`: the first status past `queued`, then the end."""
        headers = {"Authorization": f"Bearer {key}"}
        async with client.stream(
            "GET", f"/v1/videos/{record.id}/events", headers=headers, timeout=None
        ) as stream:
            kind = None
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: ") and kind is not None:
                    data = json.loads(line.removeprefix("data: "))
                    if kind == "status" and record.first_progress_s is None and data.get("stage") != "queued":
                        record.first_progress_s = self.now()
                    if kind == "done":
                        record.done_s = self.now()
                        record.status = data["status"]
                        record.timings = data.get("timings", {})
                        return

    async def one(
        self, client: httpx.AsyncClient, keys: dict[str, str], arrival: Arrival, index: int
    ) -> None:
        await asyncio.sleep(max(0.0, arrival.at_s - self.now()))
        submitted = self.now()
        try:
            ids = await self.submit(client, keys[arrival.project], arrival, index)
            records = [VideoRecord(i, arrival.project, arrival.klass, arrival.tier, submitted) for i in ids]
            self.records.extend(records)
            await asyncio.gather(*(self.follow(client, keys[arrival.project], record) for record in records))
        except httpx.HTTPError as error:
            self.errors.append(f"{arrival.klass} {index}: {error}")

    async def run(self) -> dict[str, Any]:
        trace = arrivals(self.plan)
        async with httpx.AsyncClient(base_url=self.url, timeout=60.0) as client:
            schema = (await client.get("/openapi.json")).json()
            self.tiers_offered = "quality" in schema["components"]["schemas"]["VideoCreate"]["properties"]
            keys = await self.keys(client)
            self.start = time.monotonic()
            budget = self.plan.max_seconds * 4 + 600  # arrivals end by max_seconds; then let them finish
            await asyncio.wait_for(
                asyncio.gather(*(self.one(client, keys, arrival, i) for i, arrival in enumerate(trace))),
                budget,
            )
        return self.result(time.monotonic() - self.start)

    def result(self, wall_s: float) -> dict[str, Any]:
        done = [record for record in self.records if record.done_s is not None]
        classes: dict[str, dict[str, Any]] = {}
        for name in sorted({f"{record.klass}/{record.tier}" for record in self.records}):
            mine = [record for record in done if f"{record.klass}/{record.tier}" == name]
            first = [r.first_progress_s - r.arrival_s for r in mine if r.first_progress_s is not None]
            classes[name] = {
                "videos": sum(1 for r in self.records if f"{r.klass}/{r.tier}" == name),
                "completed": sum(1 for r in mine if r.status == "completed"),
                "time_to_first_progress_s": summary(first) if first else None,
                "time_to_done_s": summary([r.done_s - r.arrival_s for r in mine]) if mine else None,
            }
        return {
            "plan": asdict(self.plan),
            "tiers": "quality" if self.tiers_offered else "steps",
            "wall_s": wall_s,
            "videos": len(self.records),
            "completed": sum(1 for record in done if record.status == "completed"),
            "throughput_per_hour": len(done) / wall_s * 3600 if wall_s else 0.0,
            "rejected_429": dict(self.rejected),
            "errors": self.errors,
            "classes": classes,
            "projects": per_project(done),
            "jain_fairness": jain([values["service_rate"] for values in per_project(done).values()]),
            "records": [asdict(record) for record in self.records],
        }


def per_project(done: list[VideoRecord]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for record in done:
        groups[record.project].append(record.done_s - record.arrival_s)
    return {
        project: {
            "videos": len(values),
            "mean_s": statistics.fmean(values),
            "service_rate": 1 / statistics.fmean(values),
        }
        for project, values in sorted(groups.items())
    }


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when every project is served alike, 1/n when one gets everything."""
    if not values:
        return 1.0
    return sum(values) ** 2 / (len(values) * sum(value * value for value in values))


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['videos']} videos, {result['completed']} completed in {result['wall_s']:.1f} s "
        f"({result['throughput_per_hour']:.0f}/h), 429s {result['rejected_429']}, "
        f"tiers by {result['tiers']}, Jain {result['jain_fairness']:.3f}"
    ]
    lines.append("class                 n   first p50  first p95   done p50   done p95   done p99")
    for name, values in result["classes"].items():
        first, done = values["time_to_first_progress_s"] or {}, values["time_to_done_s"] or {}
        figures = [first.get("p50"), first.get("p95"), done.get("p50"), done.get("p95"), done.get("p99")]
        shown = "".join(f"   {value if value is not None else float('nan'):8.2f}" for value in figures)
        lines.append(f"{name:20} {values['videos']:3}{shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--admin-key", required=True, help="a studio_admin key (creates the load projects)")
    for name, value in asdict(LoadPlan()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--json", type=Path, help="write the run here")
    args = vars(parser.parse_args(argv))
    url, key, out = args.pop("url"), args.pop("admin_key"), args.pop("json")
    result = asyncio.run(StudioLoad(url, key, LoadPlan(**args)).run())
    print(table(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
