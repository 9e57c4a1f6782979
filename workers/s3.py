"""boto3 helpers: one client factory for S3Proxy and real AWS, plus small object helpers."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from workers.config import Settings
from workers.errors import UnreachableError


def s3_client(settings: Settings, connect_timeout: float = 5, retries: int = 5) -> BaseClient:
    """A boto3 S3 client; credentials from settings when given, else boto's default chain."""
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        config=Config(
            connect_timeout=connect_timeout,
            read_timeout=60,
            retries={"max_attempts": retries, "mode": "standard"},
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
        ),
    )


def ensure_bucket(client: BaseClient, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket"}:
            raise
        client.create_bucket(Bucket=bucket)


def check_reachable(settings: Settings, timeout: float = 10) -> None:
    """ListBuckets, or a clear error naming the endpoint (never the credentials)."""
    client = s3_client(settings, connect_timeout=timeout, retries=1)
    where = settings.s3_endpoint_url or "AWS S3"
    try:
        client.list_buckets()
    except EndpointConnectionError:
        raise UnreachableError(
            f"S3 at {where} is unreachable; start it with `kappa stack up` or check KAPPA_S3_ENDPOINT_URL"
        ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise UnreachableError(f"S3 at {where} refused the request ({code}); check AWS_ACCESS_KEY_ID/SECRET") from None
    except BotoCoreError as exc:
        raise UnreachableError(f"S3 at {where} failed: {type(exc).__name__}") from None


def iter_keys(client: BaseClient, bucket: str, prefix: str) -> Iterator[dict]:
    """Every object under ``prefix`` (Key, Size, ...), paginated."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def get_bytes(client: BaseClient, bucket: str, key: str) -> bytes | None:
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
            return None
        raise
