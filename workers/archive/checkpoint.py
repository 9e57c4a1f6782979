"""The archiver's S3 checkpoint of one partition: where archiving resumes, and who wrote it.

Stored at ``keys.archiver_checkpoint(topic, partition)`` and only ever replaced by a conditional write
(``workers.s3.put_if``), so the typed model here is the one reader and writer of its JSON.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from workers.errors import KappaError


@dataclass(frozen=True)
class ArchiverCheckpoint:
    """Everything below ``next_offset`` of ``topic[partition]`` is in the archive (``files`` were the last written)."""

    topic: str
    partition: int
    next_offset: int
    #: the Kafka topic id: a checkpoint of another id means the topic was recreated (offsets restarted)
    topic_id: str | None = None
    group: str | None = None
    writer: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    written_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    files: list[str] = field(default_factory=list)


def to_json(checkpoint: ArchiverCheckpoint) -> bytes:
    return json.dumps(asdict(checkpoint)).encode()


def from_json(body: bytes | str, topic: str = "", partition: int = -1) -> ArchiverCheckpoint:
    """Parse a stored checkpoint; ``topic``/``partition`` (known from its key) fill in what it lacks.

    Unknown keys are ignored; a missing or non-numeric ``next_offset`` is an error.
    """
    doc: Any = json.loads(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("next_offset"), int):
        raise KappaError("an archiver checkpoint needs an integer next_offset: move it aside and restart")
    return ArchiverCheckpoint(
        topic=str(doc.get("topic", topic)),
        partition=int(doc.get("partition", partition)),
        next_offset=int(doc["next_offset"]),
        topic_id=doc.get("topic_id"),
        group=doc.get("group"),
        writer=str(doc.get("writer", "")),
        written_at_ms=int(doc.get("written_at_ms", 0)),
        files=list(doc.get("files") or []),
    )
