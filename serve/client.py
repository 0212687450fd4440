"""A small HTTP client of the Previz API (the CLI's and the tests')."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx


class PrevizApiError(RuntimeError):
    """An error answer from the API, with its machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class PrevizClient:
    def __init__(self, base_url: str, *, api_key: str = "previz-local", timeout_s: float = 30) -> None:
        self.http = httpx.Client(
            base_url=base_url, timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"}
        )

    def create(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self.http.post("/v1/videos", json=body, headers=headers))

    def get(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/videos/{job_id}"))

    def download(self, job_id: str, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.http.stream("GET", f"/v1/videos/{job_id}/content", follow_redirects=True) as response:
            if response.status_code != 200:
                response.read()
                self._json(response)
            with path.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return path

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError):
                error = {"code": "http_error", "message": response.text[:500]}
            raise PrevizApiError(response.status_code, error["code"], error["message"])
        return response.json()
