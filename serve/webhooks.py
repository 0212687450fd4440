"""Webhooks: a signed POST to a job's `callback_url` when it finishes (or its review status changes),
retried with exponential backoff (a non-2xx answer, a connection failure or a host that does not resolve;
a URL a rule refuses is final).

The job store's outbox (serve/jobs/outbox.py) holds one row per finished job that asked for a callback;
the WebhookDispatcher (an asyncio task of the Scheduler replica) leases due rows, POSTs them and records
every attempt. Each request carries, Stripe-style:

    Previz-Event: video.completed            (or video.failed, video.cancelled, video.review_changed)
    Previz-Delivery: whd_…                   (the payload's `id`; the same on every retry)
    Previz-Timestamp: 1764043200             (unix seconds of this attempt)
    Previz-Signature: t=1764043200,v1=<hex HMAC-SHA256(project webhook secret, f"{t}.{raw body}")>

and the body `{"id", "type", "created_at", "data": <the video object>}`. A receiver checks it with

    verify_signature(secret, request.headers, raw_body)   # raises WebhookSignatureError
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx

from serve.callbacks import CallbackPolicy, CallbackRefused, CallbackUnresolved
from serve.config import WebhookSettings
from serve.http.views import video_payload
from serve.jobs import JobStore
from serve.jobs.models import utcnow
from serve.jobs.outbox import WebhookDelivery
from serve.metrics import record_webhook_delivery

logger = logging.getLogger("ray.serve")

EVENT_HEADER = "Previz-Event"
DELIVERY_HEADER = "Previz-Delivery"
TIMESTAMP_HEADER = "Previz-Timestamp"
SIGNATURE_HEADER = "Previz-Signature"
USER_AGENT = "Previz-Webhooks/1.0"
DEFAULT_TOLERANCE_S = 300  # how old a signed timestamp a receiver accepts (replay window)
BATCH_SIZE = 32  # deliveries one dispatcher pass leases
LEASE_SLACK_S = 30.0  # a lease outlives one attempt's timeout by this much
MAX_ERROR_CHARS = 500


LINK_FIELDS = ("content_url", "thumbnail_url")  # the video's links a receiver follows


class WebhookSignatureError(ValueError):
    """verify_signature() refused a request: missing or malformed headers, a stale timestamp, or a
    signature that does not match the body."""


def open_job_store(url: str) -> JobStore:
    """The job store as the serve layer opens it: a finished job's webhook carries the API's own video
    object, so a webhook and `GET /v1/videos/{id}` never disagree."""
    return JobStore(url, webhook_body=video_payload)


def encode_payload(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed): compact JSON with sorted keys."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of f"{timestamp}.{body}" keyed with the project's secret."""
    message = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_headers(
    secret: str, delivery_id: str, event: str, body: bytes, timestamp: int
) -> dict[str, str]:
    """The Previz-* headers of one attempt (the timestamp is the attempt's, so retries stay fresh)."""
    return {
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: f"t={timestamp},v1={sign(secret, timestamp, body)}",
    }


def verify_signature(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    *,
    now: float | None = None,
) -> int:
    """Check a webhook request as a receiver must: the Previz-Signature header's `t` is within
    `tolerance_s` of `now` (default: the clock) and one of its `v1` values is the HMAC of `t` and the raw
    `body` (compared in constant time). Returns the signed timestamp; raises WebhookSignatureError."""
    lowered = {name.lower(): value for name, value in headers.items()}
    header = lowered.get(SIGNATURE_HEADER.lower())
    if not header:
        raise WebhookSignatureError(f"the {SIGNATURE_HEADER} header is missing")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not value:
            raise WebhookSignatureError(
                f"{SIGNATURE_HEADER} must look like t=<unix>,v1=<hex> but is {header!r}"
            )
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise WebhookSignatureError(f"{SIGNATURE_HEADER} has a non-integer t={value!r}") from None
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise WebhookSignatureError(f"{SIGNATURE_HEADER} must carry t=<unix> and v1=<hex> but is {header!r}")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance_s:
        raise WebhookSignatureError(
            f"the signed timestamp {timestamp} is {age:.0f} s from now; at most {tolerance_s:g} s is accepted"
        )
    expected = sign(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise WebhookSignatureError("no v1 signature matches the body and timestamp")
    return timestamp


def retry_delay_s(attempt: int, settings: WebhookSettings, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): min(cap, base·2^(attempt-1)),
    scaled by a jitter in [0.75, 1] so that receivers recovering from an outage are not hit in lockstep
    (below the cap, a later delay still never undercuts an earlier one)."""
    delay = min(settings.retry_cap_s, settings.retry_base_s * 2 ** (attempt - 1))
    return delay * (rng or random).uniform(0.75, 1.0)


def absolute_links(payload: dict[str, Any], public_url: str | None) -> dict[str, Any]:
    """The payload with its video's links (`content_url`, `thumbnail_url`: paths in the outbox) made
    absolute with the deployment's `public_url`; unchanged without one."""
    video = payload.get("data")
    if public_url is None or not isinstance(video, dict):
        return payload
    base = public_url.rstrip("/")
    links = {
        name: base + link
        for name in LINK_FIELDS
        if isinstance(link := video.get(name), str) and link.startswith("/")
    }
    return {**payload, "data": {**video, **links}}


def callback_policy(settings: WebhookSettings) -> CallbackPolicy:
    return CallbackPolicy(allow_http=settings.allow_http, allowed_hosts=settings.allowed_hosts)


def _error_class(failure: Exception) -> str:
    """A short, fixed description of a failed attempt: which kind of failure, never the socket's message
    (those texts map ports and hosts of the network the receiver is in)."""
    if isinstance(failure, httpx.TimeoutException):
        return "timeout"
    if isinstance(failure, httpx.ConnectError):
        return "connection failed"
    if isinstance(failure, httpx.RemoteProtocolError):
        return "protocol error"
    return "request failed"


class WebhookDispatcher:
    """Sends due webhooks from the outbox. Any number may run against one store (leases keep them apart)."""

    def __init__(
        self,
        store: JobStore,
        settings: WebhookSettings,
        policy: CallbackPolicy | None = None,
        *,
        public_url: str | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.policy = policy or callback_policy(settings)
        self.public_url = public_url
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A job just finished: look at the outbox now instead of at the next poll."""
        self._wake.set()

    async def run_forever(self) -> None:
        async with httpx.AsyncClient(
            timeout=self.settings.timeout_s, follow_redirects=False, headers={"User-Agent": USER_AGENT}
        ) as client:
            while True:
                try:
                    num_due = await self.run_once(client)
                except Exception:
                    logger.warning("webhook dispatch pass failed; retrying", exc_info=True)
                    num_due = 0
                if num_due < BATCH_SIZE:  # after a full batch more may be due: go again at once
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=self.settings.poll_interval_s)
                    self._wake.clear()

    async def run_once(self, client: httpx.AsyncClient) -> int:
        """Lease the due deliveries and attempt each once, concurrently. Returns how many were due."""
        lease_s = self.settings.timeout_s + LEASE_SLACK_S
        due = await asyncio.to_thread(self.store.due_webhooks, BATCH_SIZE, lease_s)
        outcomes = await asyncio.gather(*(self._attempt(client, d) for d in due), return_exceptions=True)
        for delivery, outcome in zip(due, outcomes, strict=True):
            if isinstance(
                outcome, Exception
            ):  # e.g. the store was unreachable: its lease runs out, it retries
                logger.warning("webhook %s: attempt not recorded", delivery.id, exc_info=outcome)
        return len(due)

    async def _attempt(self, client: httpx.AsyncClient, delivery: WebhookDelivery) -> None:
        attempt = delivery.attempts + 1
        secret = await asyncio.to_thread(self.store.webhook_secret, delivery.project)
        if not secret:  # nothing can sign it: fail now, visibly, rather than send it unsigned
            error = f"project {delivery.project!r} has no webhook secret; the webhook cannot be signed"
            await self._record(delivery, ok=False, status_code=None, error=error, seconds=0.0, final=True)
            return
        try:  # the rules again, on the addresses the host resolves to now (DNS rebinding)
            target = await self.policy.target(delivery.url)
        except CallbackUnresolved as unresolved:  # transient (a DNS blip): retried like a 5xx
            await self._record_failure(
                delivery, attempt, status_code=None, error=str(unresolved), seconds=0.0
            )
            return
        except CallbackRefused as refused:  # a rule: final
            await self._record(
                delivery, ok=False, status_code=None, error=str(refused), seconds=0.0, final=True
            )
            return
        body = encode_payload(absolute_links(delivery.payload, self.public_url))
        headers = signature_headers(secret, delivery.id, delivery.event, body, int(time.time()))
        headers["Content-Type"] = "application/json"
        headers["Host"] = urlsplit(delivery.url).netloc
        started = time.perf_counter()
        status_code: int | None = None
        try:  # to the address just checked; TLS still verifies the host's name
            response = await client.post(
                target.connect_url, content=body, headers=headers, extensions={"sni_hostname": target.host}
            )
            status_code = response.status_code
            ok = response.is_success
            # Only the status: the receiver's body never reaches the API (it may be an internal service's).
            error = None if ok else f"HTTP {status_code}"
        except (httpx.HTTPError, httpx.InvalidURL) as failure:
            ok, error = False, _error_class(failure)
        seconds = round(time.perf_counter() - started, 3)
        if ok:
            await self._record(
                delivery, ok=True, status_code=status_code, error=None, seconds=seconds, final=True
            )
        else:
            await self._record_failure(
                delivery, attempt, status_code=status_code, error=error, seconds=seconds
            )

    async def _record_failure(
        self, delivery: WebhookDelivery, attempt: int, *, status_code: int | None, error: str, seconds: float
    ) -> None:
        """A transient failure: retried on the backoff schedule until `max_attempts`, then final."""
        final = attempt >= self.settings.max_attempts
        if final:
            error = f"{error} (gave up after {attempt} attempts)"
        await self._record(
            delivery, ok=False, status_code=status_code, error=error, seconds=seconds, final=final
        )

    async def _record(
        self,
        delivery: WebhookDelivery,
        *,
        ok: bool,
        status_code: int | None,
        error: str | None,
        seconds: float,
        final: bool,
    ) -> None:
        attempt = delivery.attempts + 1
        next_attempt_at = (
            None if final else utcnow() + timedelta(seconds=retry_delay_s(attempt, self.settings))
        )
        recorded = await asyncio.to_thread(
            self.store.record_webhook_attempt,
            delivery.id,
            ok=ok,
            status_code=status_code,
            error=None if error is None else error[:MAX_ERROR_CHARS],
            seconds=seconds,
            next_attempt_at=next_attempt_at,
        )
        if recorded is None:  # our lease ran out and another dispatcher finished it
            logger.warning("webhook %s was no longer pending when attempt %d ended", delivery.id, attempt)
            return
        outcome = "delivered" if ok else "gave_up" if final else "failed"
        record_webhook_delivery(outcome)
        if not ok:
            logger.info("webhook %s to %s, attempt %d: %s", delivery.id, delivery.url, attempt, error)
