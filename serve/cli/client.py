"""A small HTTP client of the Previz API (the CLI's and the tests'). Any OpenAI client works too; this one
knows the studio extensions: storyboards, listing filters, the thumbnail variant, idempotency keys."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx


class PrevizApiError(RuntimeError):
    """An error answer from the API, with its machine-readable code and the field at fault."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.param = status, code, message, param


class PrevizClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 30) -> None:
        """`api_key`: sent as `Authorization: Bearer KEY`; it names the project the client acts for."""
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=headers)

    # -- videos -------------------------------------------------------------------------------------------

    def create(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self.http.post("/v1/videos", json=body, headers=headers))

    def get(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/videos/{job_id}"))

    def list(
        self,
        *,
        project: str | None = None,
        status: str | None = None,
        storyboard_id: str | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> dict[str, Any]:
        """One page: {"data": [...], "last_id", "has_more"}; pass `last_id` as `after` for the next."""
        params = {"project": project, "status": status, "storyboard_id": storyboard_id, "after": after}
        params = {key: value for key, value in params.items() if value is not None}
        return self._json(self.http.get("/v1/videos", params={**params, "limit": limit}))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running video; a finished one is left alone (409 `already_finished`)."""
        return self._json(self.http.delete(f"/v1/videos/{job_id}", params={"cancel_only": "true"}))

    def delete(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running video, or delete a finished one with its clip and poster."""
        return self._json(self.http.delete(f"/v1/videos/{job_id}"))

    def webhooks(self, job_id: str) -> dict[str, Any]:
        """The video's callback_url deliveries: {"data": [{id, event, status, attempts, log, ...}]}."""
        return self._json(self.http.get(f"/v1/videos/{job_id}/webhooks"))

    def remix(self, job_id: str, prompt: str, **fields: Any) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/videos/{job_id}/remix", json={"prompt": prompt, **fields}))

    def promote(self, job_id: str, **fields: Any) -> dict[str, Any]:
        """The final take of a draft video (same seed, prompt, shot and size unless `size` is given)."""
        return self._json(self.http.post(f"/v1/videos/{job_id}/promote", json=fields))

    def promote_takes(self, storyboard_id: str, video_ids: list[str], **fields: Any) -> dict[str, Any]:
        """The final takes of chosen drafts of a storyboard, all or none: {"data": [video, ...]}."""
        body = {"video_ids": video_ids, **fields}
        return self._json(self.http.post(f"/v1/storyboards/{storyboard_id}/promote", json=body))

    def download(self, job_id: str, path: Path, *, variant: Literal["video", "thumbnail"] = "video") -> Path:
        return self._stream_to(f"/v1/videos/{job_id}/content", path, {"variant": variant})

    def _stream_to(self, url: str, path: Path, params: dict[str, str]) -> Path:
        with self.http.stream("GET", url, params=params, follow_redirects=True) as response:
            if response.status_code != 200:
                response.read()
                self._json(response)
            path.parent.mkdir(parents=True, exist_ok=True)  # only for a file that comes
            with path.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return path

    # -- storyboards --------------------------------------------------------------------------------------

    def create_storyboard(
        self, body: dict[str, Any], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self.http.post("/v1/storyboards", json=body, headers=headers))

    def put_timeline(
        self, storyboard_id: str, data: bytes, fmt: str, *, rate: int | None = None
    ) -> dict[str, Any]:
        """Read an edited timeline (OTIO, EDL, FCP XML or AAF: exported, then edited) back onto its board."""
        params: dict[str, Any] = {"format": fmt, **({"rate": rate} if rate is not None else {})}
        media = {"fcpxml": "application/xml", "aaf": "application/octet-stream"}
        headers = {"Content-Type": media.get(fmt, "text/plain")}
        return self._json(
            self.http.put(
                f"/v1/storyboards/{storyboard_id}/timeline", params=params, content=data, headers=headers
            )
        )

    def set_review(self, video_id: str, status: str) -> dict[str, Any]:
        return self._json(self.http.put(f"/v1/videos/{video_id}/review", json={"status": status}))

    def get_review(self, video_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/videos/{video_id}/review"))

    def add_note(self, video_id: str, text: str, *, frame: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"text": text, **({"frame": frame} if frame is not None else {})}
        return self._json(self.http.post(f"/v1/videos/{video_id}/notes", json=body))

    def notes(self, video_id: str) -> list[dict[str, Any]]:
        return self._json(self.http.get(f"/v1/videos/{video_id}/notes"))["data"]

    def get_storyboard(self, storyboard_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/storyboards/{storyboard_id}"))

    def update_storyboard(
        self,
        storyboard_id: str,
        *,
        order: list[int] | None = None,
        takes: dict[int, str | None] | None = None,
    ) -> dict[str, Any]:
        """Set the shot order and/or selected takes (shot index -> video id; None clears one)."""
        body: dict[str, Any] = {}
        if order is not None:
            body["order"] = order
        if takes:
            body["takes"] = {str(shot): video for shot, video in takes.items()}
        return self._json(self.http.patch(f"/v1/storyboards/{storyboard_id}", json=body))

    def delete_storyboard(self, storyboard_id: str, *, delete_videos: bool = False) -> dict[str, Any]:
        """Delete the board and its cut; its videos are kept unless `delete_videos`."""
        params = {"delete_videos": "true"} if delete_videos else {}
        return self._json(self.http.delete(f"/v1/storyboards/{storyboard_id}", params=params))

    def create_cut(self, storyboard_id: str, **fields: Any) -> dict[str, Any]:
        """Queue the board's cut (fields: fps, size, slates, slate_seconds): the cut, `queued` (202);
        `wait_for_cut` follows it."""
        body = {key: value for key, value in fields.items() if value is not None}
        return self._json(self.http.post(f"/v1/storyboards/{storyboard_id}/cut", json=body))

    def get_cut(self, storyboard_id: str) -> dict[str, Any]:
        """The board's newest cut: its status, progress and ETA, and once completed its files."""
        return self._json(self.http.get(f"/v1/storyboards/{storyboard_id}/cut"))

    def cancel_cut(self, storyboard_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/storyboards/{storyboard_id}/cut/cancel"))

    def wait_for_cut(
        self,
        storyboard_id: str,
        *,
        timeout_s: float = 3600.0,
        poll_s: float = 0.5,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the board's cut until it is completed, failed or cancelled (`on_poll` sees each answer);
        TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            cut = self.get_cut(storyboard_id)
            if on_poll is not None:
                on_poll(cut)
            if cut["status"] in ("completed", "failed", "cancelled"):
                return cut
            if time.monotonic() > deadline:
                still = cut["status"]
                raise TimeoutError(f"the cut of {storyboard_id} is still {still} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def download_package(self, storyboard_id: str, path: Path, *, format: str = "otio") -> Path:
        """The zip of the last cut, its clips and its timeline (media as relative paths)."""
        params = {"format": format, "package": "true"}
        return self._stream_to(f"/v1/storyboards/{storyboard_id}/timeline", path, params)

    # -- admin (admin keys) -------------------------------------------------------------------------------

    def create_project(
        self, name: str, settings: dict[str, Any] | None = None, *, admin_key: bool = False
    ) -> dict[str, Any]:
        """The new project, with its `webhook_secret` (and `api_key` with `admin_key`), shown once."""
        body = {"name": name, "settings": settings or {}, "admin_key": admin_key}
        return self._json(self.http.post("/v1/admin/projects", json=body))

    def list_projects(self) -> dict[str, Any]:
        return self._json(self.http.get("/v1/admin/projects"))

    def get_project(self, name: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/admin/projects/{name}"))

    def update_project(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        return self._json(self.http.patch(f"/v1/admin/projects/{name}", json=settings))

    def create_key(self, project: str, role: str = "member", name: str | None = None) -> dict[str, Any]:
        """The new key's record; its `key` is in this answer only."""
        body = {"role": role, "name": name}
        return self._json(self.http.post(f"/v1/admin/projects/{project}/keys", json=body))

    def put_lut(
        self, project: str, name: str, cube: str, interpolation: str = "tetrahedral"
    ) -> dict[str, Any]:
        body = {"cube": cube, "interpolation": interpolation}
        return self._json(self.http.put(f"/v1/admin/projects/{project}/luts/{name}", json=body))

    def list_luts(self, project: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/admin/projects/{project}/luts"))

    def delete_lut(self, project: str, name: str) -> dict[str, Any]:
        return self._json(self.http.delete(f"/v1/admin/projects/{project}/luts/{name}"))

    def list_keys(self, project: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/admin/projects/{project}/keys"))

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._json(self.http.delete(f"/v1/admin/keys/{key_id}"))

    def rotate_key(self, key_id: str) -> dict[str, Any]:
        """A new key in place of `key_id` (same project, role, name), which is revoked; the key is shown
        in this answer only."""
        return self._json(self.http.post(f"/v1/admin/keys/{key_id}/rotate"))

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": response.text[:500]}
            raise PrevizApiError(response.status_code, error["code"], error["message"], error.get("param"))
        return response.json()
