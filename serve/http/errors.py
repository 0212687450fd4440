"""The one error shape of the HTTP API: `{"error": {"code", "message", "param"}}` (plus `category` on
`content_blocked` answers only, and `clips` on a refused timeline's `unmatched_clips` / `foreign_timeline`
only), and how pydantic's validation errors map onto it (400 with the field
named)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from serve.http.schemas import ErrorBody, ErrorResponse, UnmatchedClip


class ApiError(Exception):
    """An error answered with the one error shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        category: str | None = None,
        clips: list[UnmatchedClip] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers
        self.category = category  # the content-policy category of a `content_blocked` answer
        self.clips = clips  # the clips a refused timeline could not use


def error_response(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    category: str | None = None,
    clips: list[UnmatchedClip] | None = None,
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorBody(code=code, message=message, param=param, category=category, clips=clips)
    )
    content = body.model_dump()
    for extra in ("category", "clips"):  # only the answers they belong to carry them
        if content["error"][extra] is None:
            del content["error"][extra]
    return JSONResponse(content, status_code=status, headers=headers)


def error_code(pydantic_type: str) -> str:
    """Our error code for a pydantic error type."""
    if pydantic_type == "missing":
        return "missing_field"
    if pydantic_type == "extra_forbidden":
        return "unknown_field"
    if pydantic_type == "json_invalid":
        return "invalid_json"
    if pydantic_type.endswith(("_type", "_parsing")) or pydantic_type in ("int_from_float", "url_scheme"):
        return "invalid_type" if pydantic_type != "url_scheme" else "invalid_value"
    return "invalid_value"


def is_type_tag(part: str) -> bool:
    """Pydantic puts the tried member of a union into the error location (`seconds.float`)."""
    return part in ("str", "float", "int", "bool", "constrained-str", "constrained-int") or "[" in part


def invalid(errors: list[dict[str, Any]], prefix: str = "") -> ApiError:
    """A 400 for the first of pydantic's `errors`, naming its field (dotted, after `prefix`)."""
    first = errors[0]
    parts = [str(part) for part in first["loc"] if part not in ("body", "query", "path", "header", "cookie")]
    # unions add their member's type to the location (`seconds.str`): drop those
    parts = [part for part in parts if not is_type_tag(part)]
    param = prefix + ".".join(parts) if parts else (prefix.rstrip(".") or None)
    if first["type"] == "json_invalid":  # its location is a character offset, not a field
        param = None
    message = str(first["msg"]).removeprefix("Value error, ")
    if param and first["type"] != "json_invalid" and f"`{param}`" not in message:
        message = f"`{param}`: {message}"
    code = error_code(first["type"])
    return ApiError(400, code, message, param)


def safety_unavailable(param: str) -> ApiError:
    """The 503 of a content check that failed to answer: the policy fails closed, and nothing was queued."""
    message = "the content check is unavailable, so nothing was queued; try again later"
    return ApiError(503, "safety_unavailable", message, param)


# The documented error answers of every route (the OpenAPI page), and the content policy's 422.
# 400s that a request the OpenAPI schema allows may still get: rules of this deployment (its size envelope,
# callback policy, sharding degrees), of the key's project, and across fields where JSON Schema has no
# words (sums, products). Every other 400 means the request broke the published schema.
RULES_BEYOND_SCHEMA: dict[str, str] = {
    "outside_envelope": "the size or length is outside this deployment's envelope (`GET /v1/models`)",
    "upscale_not_enlarging": "`upscale` must make the clip larger, within the upscaler's largest side",
    "size_not_shardable": "the size does not split over this deployment's sharding degree",
    "invalid_callback_url": "`callback_url` breaks this deployment's callback policy",
    "label_required": "the project burns the draft label into every clip",
    "invalid_cursor": "`after` names no video of this project",
    "prompt_too_long": "the shot compiled with the prompt exceeds the prompt's 4000 characters",
    "too_many_videos": "the board's shots × variants exceed the most videos one storyboard may hold",
    "unknown_adapter": "`loras` names an adapter this deployment does not load for the project, or one "
    "twice (`GET /v1/models` lists the adapters)",
    "tier_unavailable": "`quality: draft` on a deployment without the draft tier's distill LoRA",
    "cache_not_for_draft": "`cache` on a video whose tier is draft by the project's `default_quality` or "
    "its priority's default (`interactive`: draft); `quality: draft` with `cache` is refused by the schema",
    "unknown_look": "`look` names no LUT of the project (`none` and `film` are built in)",
    "invalid_lut": "the .cube file is malformed; the message names the line at fault",
    "reserved_look_name": "`none` and `film` are the built-in looks; a LUT needs another name",
    "invalid_shot": "a shot index beyond the storyboard's shots",
    "invalid_take": "a selected take that is not a video of that shot of the storyboard",
    # keyframes (serve.http.images, serve.http.keyframes): nothing is stored when one is refused
    "invalid_image": "a keyframe is not a PNG, JPEG or WebP image that decodes to the end",
    "image_too_large": "a keyframe is over 8 MiB or 4096x4096 (16,777,216) pixels",
    "decompression_bomb": "a keyframe's header declares more pixels than Pillow decodes (a bomb)",
    "animated_image": "a keyframe has more than one frame (animated PNG or WebP); send one still image",
    "invalid_data_url": "an image given as text is not a base64 `data:` URL",
    "image_url_not_allowed": "an image given as an http(s) URL: Previz never fetches URLs; send the image",
    "keyframes_not_supported": "keyframes or `input_reference` with `model` wan2.2-t2v-a14b (text only)",
    "keyframe_required": "`model` wan2.2-i2v-a14b without an image to start from",
    "model_not_served": "an image or `continue` on a deployment that serves no I2V model (`i2v` unset)",
    "invalid_take_reference": "a keyframe's `video` (or `file_id`) names no video of the project",
    "take_not_finished": "a keyframe's `video` names a take that has not completed (or kept no last frame)",
    "invalid_continue": "a shot's `continue` on the first shot, naming no earlier shot, or with "
    "`keyframes.first`",
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (
            400,
            "Bad input; `param` names the field. Besides breaking this schema, a request may break a rule "
            "of the deployment or project: "
            + "; ".join(f"`{code}`: {rule}" for code, rule in RULES_BEYOND_SCHEMA.items())
            + ".",
        ),
        (401, "No API key, or not a valid one; see WWW-Authenticate."),
        (403, "The key may not do this (another project, or an admin route)."),
        (404, "No such id."),
        (
            409,
            "Conflicts with the state of the video, storyboard or cut; `code` says which (e.g. "
            "`already_finished`, `no_cut`, `cut_stale`: a take of the cut was deleted, `take_deleted`).",
        ),
        (429, "A queue or quota is full; see Retry-After."),
        (503, "Not ready."),
    )
}
BLOCKED: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "Refused by the content policy: `content_blocked`."}
}
TIMELINE_REFUSED: dict[int | str, dict[str, Any]] = {
    422: {
        "model": ErrorResponse,
        "description": "`unmatched_clips`: clips of the timeline cannot be used, nothing was changed; "
        "`clips` lists each with its `reason`.",
    }
}
