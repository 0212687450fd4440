"""The one S3 client builder: the weights sync (`pipeline.s3sync`) and the artifact store and LUT reader
(`serve.storage`, `serve.luts`) all build their boto3 client here, so they sign, retry and time out alike.
"""

from __future__ import annotations

import boto3
from botocore.client import BaseClient
from botocore.config import Config

S3_MAX_ATTEMPTS = 5  # total tries of one S3 request (first one included) before the caller sees the error
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 60.0


def make_s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    *,
    max_attempts: int = S3_MAX_ATTEMPTS,
    connect_timeout_s: float = S3_CONNECT_TIMEOUT_S,
    read_timeout_s: float = S3_READ_TIMEOUT_S,
) -> BaseClient:
    """A boto3 S3 client: SigV4, standard retries, path-style for custom endpoints. What is not given
    (credentials, and the region when None) comes from boto3's environment/config/role chain.

    `max_attempts` counts every try of a request, the first included.
    """
    config = Config(
        signature_version="s3v4",  # presigned URLs carry X-Amz-Expires, which servers enforce
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        # SeaweedFS/MinIO endpoints rarely have per-bucket DNS names
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
