"""A VAEDecoder replica that owns a rank group (`decoder.parallel: 2`: a placement group of 2 CPU bundles,
rank 1 a DecodeWorker actor, gloo) decodes a final's latents to the frames of the session app's one-rank
VAEDecoder, split over both ranks; when its worker dies, the health check fails and Serve replaces the
whole group, which then decodes again.

The 2-rank decoder is a small Serve app of its own (`previz-decode2`, no route: only handle calls), beside
the session's `previz` app in the same Ray instance and deleted after the module, so the session app is
left as it is; it holds one deployment, so it costs a replica and a worker, not a second Previz.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import numpy as np
import pytest
import ray
from ray import serve

from serve.config import PrevizArgs
from serve.stages import decoder
from serve.stages.decode_group import decode_worker_name
from serve.stages.payloads import FrameBatch, StateRef
from serve.stages.transfer import PackedState
from tests.support.cluster import Cluster

pytestmark = pytest.mark.cluster

APP = "previz-decode2"
# 9 x 13 latents (104x72 pixels) go 1 x 2 over 2 ranks (grid_shape): columns 7 + 6, an uneven split
LATENTS = (16, 3, 9, 13)
WAIT_S = 600  # bound of the wait for a new group on a loaded 2-core box; no timing is asserted
MAX_FLIPPED = 1e-3  # of uint8 values may round the other way (float sums in another order: ~1e-7 apart)


@pytest.fixture(scope="module")
def two_ranks(cluster: Cluster) -> Iterator[serve.handle.DeploymentHandle]:
    config = copy.deepcopy(cluster.config["applications"][0]["args"])
    config["decoder"] = {**config.get("decoder", {}), "parallel": 2, "timeout_s": 120}
    args = PrevizArgs.model_validate(config)
    options = {
        **decoder.default_options(args),
        "ray_actor_options": {"num_cpus": 0.1},  # beside the session app on a small box
        "placement_group_bundles": [{"CPU": 0.1}, {"CPU": 0.1}],
    }
    handle = serve.run(
        decoder.VAEDecoderDeployment.options(**options).bind(args), name=APP, route_prefix=None
    )
    try:
        yield handle
    finally:
        serve.delete(APP)


def decode(handle: serve.handle.DeploymentHandle, latents: np.ndarray) -> np.ndarray:
    """One final's decode by `handle`'s VAEDecoder, the way the Scheduler calls it (a streaming call)."""
    packed = PackedState(
        latents=latents,
        num_steps=1,
        step_index=1,
        lower_order_nums=0,
        this_order=1,
        model_outputs=(),
        timestep_list=(),
        last_sample=None,
    )
    state = StateRef(ref=[ray.put(packed)], step_index=1, nbytes=latents.nbytes)
    (frames,) = [
        item
        for item in handle.options(stream=True).decode.remote(state, 16, "final")
        if isinstance(item, FrameBatch)
    ]
    return ray.get(frames.ref[0])


def assert_same_frames(split: np.ndarray, reference: np.ndarray) -> None:
    assert split.shape == reference.shape == (9, 72, 104, 3)
    differ = split != reference
    print(f"2 ranks vs 1: {int(differ.sum())} of {differ.size} uint8 values one level apart")
    assert np.abs(split.astype(int) - reference.astype(int)).max() <= 1
    assert differ.mean() <= MAX_FLIPPED


def replicas() -> list[str]:
    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{APP}#{decoder.NAME}#")
    ]


def test_a_2_rank_decoder_makes_the_frames_of_the_1_rank_decoder(
    cluster: Cluster, two_ranks: serve.handle.DeploymentHandle
) -> None:
    latents = np.random.default_rng(27).standard_normal(LATENTS).astype(np.float32)
    one_rank = serve.get_deployment_handle(decoder.NAME, app_name="previz")
    assert_same_frames(decode(two_ranks, latents), decode(one_rank, latents))
    assert two_ranks.stats.remote().result() == {"vae": 1, "split": 1}  # the group decoded it
    (replica,) = replicas()
    worker = ray.get_actor(decode_worker_name(replica, 1), namespace="serve")  # rank 1 in its own actor
    assert ray.get(worker.ping.remote()) == 1


def test_a_dead_worker_fails_the_health_check_and_serve_replaces_the_whole_group(
    cluster: Cluster, two_ranks: serve.handle.DeploymentHandle
) -> None:
    (replica,) = replicas()
    ray.kill(ray.get_actor(decode_worker_name(replica, 1), namespace="serve"), no_restart=True)
    deadline = time.monotonic() + WAIT_S
    while True:
        assert time.monotonic() < deadline, replicas()
        names = replicas()
        if len(names) == 1 and names[0] != replica:
            try:
                worker = ray.get_actor(decode_worker_name(names[0], 1), namespace="serve")
                if ray.get(worker.ping.remote(), timeout=5) == 1:
                    break
            except (ValueError, ray.exceptions.RayError):
                pass  # the new group is still forming
        time.sleep(1)
    latents = np.random.default_rng(28).standard_normal(LATENTS).astype(np.float32)
    one_rank = serve.get_deployment_handle(decoder.NAME, app_name="previz")
    assert_same_frames(decode(two_ranks, latents), decode(one_rank, latents))
    assert two_ranks.stats.remote().result() == {"vae": 1, "split": 1}  # the new replica's first decode
