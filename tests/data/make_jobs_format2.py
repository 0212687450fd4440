"""Makes tests/data/jobs-format2.db: a job store as the code before the store's repositories (issue 22)
wrote it, through the HTTP API of that code, so a later version's tests can open it and run its jobs.

    .venv/bin/python -m tests.data.make_jobs_format2      # from the repository root; rewrites the file

What it holds (the ids are printed; tests/test_stored_format2.py names them):
- project `studio-a` with settings (queue bound, GPU quota, retention, default fps 24, draft tier) and a
  registered LUT `warm`;
- a QUEUED video of `studio-a`: interactive, seed 1234, 4 steps, the `warm` LUT look, 24 fps, labels, a
  callback and an idempotency key;
- a COMPLETED video of `default` (a stored clip and poster, GPU seconds recorded);
- a storyboard of `default` with two shots × one take, both completed, its edit (shot order and a
  selected take) and a rendered 24 fps cut: its `request`, `edit` and `cut` columns all set.
The artifacts the jobs and the cut point to are not kept: only the database is test data.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from tests.support.api_app import TINY, finish, local_api
from tests.test_editorial_api import finish_with_clip, warm_cube

TARGET = Path(__file__).parent / "jobs-format2.db"


def make(target: Path) -> dict[str, str]:
    """Write the database to `target`; the ids of what it holds, by name."""
    with tempfile.TemporaryDirectory() as scratch, local_api(Path(scratch)) as api:
        settings = {
            "max_queued_jobs": 50,
            "gpu_seconds_per_day": 3600,
            "retention_days": 30,
            "default_fps": 24,
            "default_quality": "draft",
        }
        created = api.client.post("/v1/admin/projects", json={"name": "studio-a", "settings": settings})
        assert created.status_code == 201, created.text
        lut = api.client.put("/v1/admin/projects/studio-a/luts/warm", json={"cube": warm_cube()})
        assert lut.status_code == 201, lut.text
        studio = api.client_for("studio-a")
        queued = studio.post(
            "/v1/videos",
            json={
                "prompt": "a lighthouse at dusk, waves below",
                **TINY,
                "seed": 1234,
                "priority": "interactive",
                "look": "warm",
                "labels": {"shot": "7C", "artist": "mo"},
                "callback_url": "https://hooks.example.com/previz",
            },
            headers={"Idempotency-Key": "shot-7c"},
        )
        assert queued.status_code in (200, 201), queued.text
        done = api.client.post("/v1/videos", json={"prompt": "an empty hall", **TINY, "seed": 5}).json()
        finish(api, done["id"])
        assert api.store.add_gpu_seconds(done["id"], 1.5)
        board = api.client.post(
            "/v1/storyboards",
            json={
                "title": "act 2",
                "shots": [
                    {"name": "2A", "prompt": "a door opens", **TINY},
                    {"name": "2B", "prompt": "a corridor, lit", **TINY},
                ],
                "variants": {"seeds": [3]},
                "fps": 24,
            },
        ).json()
        for shot in board["shots"]:
            for video in shot["videos"]:
                finish_with_clip(api, video["video_id"], 40 + 30 * shot["index"])
        url = f"/v1/storyboards/{board['id']}"
        takes = {"0": board["shots"][0]["videos"][0]["video_id"]}
        patched = api.client.patch(url, json={"order": [1, 0], "takes": takes})
        assert patched.status_code == 200, patched.text
        cut = api.client.post(f"{url}/cut", json={"fps": 24})
        assert cut.status_code in (200, 201), cut.text
        record = api.store.get_storyboard(board["id"])
        assert record is not None and record.edit and record.cut and record.request
        api.store.close()
        shutil.copy(Path(scratch) / "jobs.db", target)
    return {"queued": queued.json()["id"], "completed": done["id"], "storyboard": board["id"]}


if __name__ == "__main__":
    ids = make(Path(sys.argv[1]) if len(sys.argv) > 1 else TARGET)
    for name, value in ids.items():
        print(f"{name}: {value}")
