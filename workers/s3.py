"""boto3 helpers: one client factory for S3Proxy and real AWS, small object helpers, and the one
conditional write every commit point in S3 goes through (:func:`put_if`, :class:`Fenced`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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
            # a stalled request (seen: S3Proxy not answering one PUT under load) is retried after
            # 15 s instead of holding a worker for a minute; a conditional PUT retried after it
            # landed is recognised by put_if
            read_timeout=15,
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


# ---------------------------------------------------------------- commit points: conditional writes

#: Error codes meaning "the object is not the version this write was based on". 412 is S3's answer to
#: a failed If-Match / If-None-Match; 409 is AWS's answer while another conditional write of the key
#: is in flight (we cannot know who wins, so we re-read); 404 answers If-Match on a deleted object.
FENCE_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"})


class Fenced(Exception):
    """Another writer committed (or removed) this object since we read it: our write did not land.

    The one owner of the concept for every commit point (processor state, archiver checkpoint):
    the loser drops what it based the write on and re-reads. ``current`` is what the object holds
    now (None if absent), so the caller can name the writer it lost to.
    """

    def __init__(self, key: str, current: bytes | None, detail: str = "") -> None:
        self.key, self.current = key, current
        super().__init__(detail or f"{key} changed since it was read (a newer writer committed)")


@dataclass(frozen=True)
class Stored:
    """An object's bytes and the ETag to make a later write conditional on."""

    body: bytes
    etag: str


def get_stored(client: BaseClient, bucket: str, key: str) -> Stored | None:
    """The object with its ETag, or None if it does not exist."""
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
            return None
        raise
    return Stored(response["Body"].read(), response["ETag"])


def put_if(
    client: BaseClient, bucket: str, key: str, body: bytes, etag: str | None, content_type: str = "application/json"
) -> str:
    """PUT ``body`` only if ``key`` still is at ``etag`` (``If-Match``), or, with ``etag=None``, does not
    exist yet (``If-None-Match: *``). Returns the new ETag; raises :class:`Fenced` if the condition failed.

    Compare-and-swap on one object (rather than create-only objects per sequence) keeps one key per
    commit point, so readers never list to find the newest commit and nothing needs garbage
    collection; an ETag never repeats because every commit body holds a new sequence/offset.
    A PUT that boto retried after a lost response answers 412 although its first attempt landed:
    if the object now holds exactly ``body`` (unique per commit), the write is ours.
    """
    condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
    try:
        response = client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, **condition)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in FENCE_CODES:
            raise
        now = get_stored(client, bucket, key)
        if now is not None and now.body == body:
            return now.etag
        raise Fenced(key, None if now is None else now.body) from None
    return response["ETag"]


def still_at(client: BaseClient, bucket: str, key: str, etag: str | None) -> None:
    """Raise :class:`Fenced` unless ``key`` is still at ``etag`` (absent for None): a cheap HEAD a
    writer makes before writing data objects, so a zombie notices before it adds anything."""
    try:
        if etag is None:
            client.head_object(Bucket=bucket, Key=key)
        else:
            client.head_object(Bucket=bucket, Key=key, IfMatch=etag)
            return
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if etag is None and code in {"NoSuchKey", "404"}:
            return
        if code not in FENCE_CODES:
            raise
    now = get_stored(client, bucket, key)
    raise Fenced(key, None if now is None else now.body)


def get_if(client: BaseClient, bucket: str, key: str, etag: str) -> bytes:
    """The object's bytes only if it is still at ``etag`` (``If-Match``): a reader of one exact snapshot
    (a replay load, the reference, the gate) gets :class:`Fenced` instead of a newer or vanished version."""
    try:
        return client.get_object(Bucket=bucket, Key=key, IfMatch=etag)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in FENCE_CODES:
            raise
    raise Fenced(key, None, f"{key} is no longer at version {etag} (rewritten or removed)")


def delete_if(client: BaseClient, bucket: str, key: str, etag: str) -> bool:
    """Delete ``key`` only while it is at ``etag``; False when another writer replaced it (left alone)."""
    try:
        client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in FENCE_CODES:
            raise
        return False
    return True


def delete_prefix(client: BaseClient, bucket: str, prefix: str) -> int:
    """Delete every object under ``prefix`` (1000 per request); returns how many."""
    keys_ = [obj["Key"] for obj in iter_keys(client, bucket, prefix)]
    for start in range(0, len(keys_), 1000):
        batch = [{"Key": key} for key in keys_[start : start + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    return len(keys_)
