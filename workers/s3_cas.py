"""Compare-and-swap on S3 objects: conditional writes that AWS S3 and S3Proxy 4.1 both enforce.

A commit point that is read, changed and written back (a replay manifest, a lease) is only safe
if the write fails when somebody else wrote in between. S3 gives exactly that: ``If-None-Match: *``
creates an object only if it does not exist, ``If-Match: <etag>`` replaces it only if it is still
the version we read. Both answer ``412 PreconditionFailed`` otherwise (``409
ConditionalRequestConflict`` while a racing conditional write is in flight).
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from workers.errors import KappaError

CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


class Conflict(KappaError):
    """The object is not the version the writer read (another writer won): stop, do not retry blindly."""


def is_conflict(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in CONFLICT_CODES


def read(client: Any, bucket: str, key: str) -> tuple[bytes, str] | None:
    """The object's bytes and ETag, or None when it does not exist."""
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
            return None
        raise
    return response["Body"].read(), response["ETag"]


def put(
    client: Any, bucket: str, key: str, body: bytes, etag: str | None, content_type: str = "application/json"
) -> str:
    """Write ``body`` only over version ``etag`` (None: only if absent); returns the new ETag or raises Conflict."""
    condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
    try:
        response = client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, **condition)
    except ClientError as exc:
        gone = etag is not None and exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}
        if is_conflict(exc) or gone:  # the version we read was replaced, or deleted, by another writer
            expected = f"version {etag}" if etag else "no object"
            raise Conflict(f"s3://{bucket}/{key} changed: expected {expected}, another writer won") from None
        raise
    return response["ETag"]


def delete(client: Any, bucket: str, key: str, etag: str) -> None:
    """Delete ``key`` only if it is still version ``etag``; raises Conflict otherwise."""
    try:
        client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
    except ClientError as exc:
        if is_conflict(exc):
            raise Conflict(f"s3://{bucket}/{key} changed before its delete: another writer owns it") from None
        if exc.response.get("Error", {}).get("Code") not in {"NoSuchKey", "404"}:
            raise
