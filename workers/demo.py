"""`make demo`: start the local stack and tell the story step by step, printing each command it runs.

Each step is a shell command a user could type themselves; the demo shows it, runs it, and stops
with one clear line if it fails.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from workers.config import apply_stack_env, load_settings
from workers.errors import KappaError
from workers.stack import Stack

console = Console()
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Show and run one command from the repo root with the venv's tools first on PATH."""
    console.print(f"[bold cyan]$ {command}[/]")
    args = shlex.split(command)
    if (BIN / args[0]).exists():
        args[0] = str(BIN / args[0])
    result = subprocess.run(args, cwd=ROOT, text=True, check=False)
    if check and result.returncode != 0:
        raise KappaError(f"demo step failed (exit {result.returncode}): {command}")
    return result


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def smoke_round_trip() -> None:
    """Produce one record and read it back; put one object and read it back."""
    from confluent_kafka import Consumer, Producer

    from workers import kafka as kafka_helpers
    from workers import s3 as s3_helpers

    settings = load_settings()
    topic = f"demo.smoke.{int(time.time())}"
    kafka_helpers.ensure_topic(settings, topic, 1)
    producer = Producer(settings.kafka_config())
    producer.produce(topic, key=b"k", value=b"hello kappa")
    producer.flush(10)
    consumer = Consumer(settings.kafka_config(**{"group.id": topic, "auto.offset.reset": "earliest"}))
    consumer.subscribe([topic])
    got = None
    deadline = time.monotonic() + 30
    while got is None and time.monotonic() < deadline:
        message = consumer.poll(1)
        if message is not None and message.error() is None:
            got = message.value()
    consumer.close()
    kafka_helpers.delete_topics(settings, [topic])
    client = s3_helpers.s3_client(settings)
    client.put_object(Bucket=settings.s3_bucket, Key="demo/smoke.txt", Body=b"hello kappa")
    body = s3_helpers.get_bytes(client, settings.s3_bucket, "demo/smoke.txt")
    if got != b"hello kappa" or body != b"hello kappa":
        raise KappaError("smoke round trip failed: Kafka or S3 did not return what was written")
    console.print("[green]Kafka and S3 round trips ok[/]")


def where_to_look(stack: Stack) -> None:
    settings = load_settings()
    console.print(
        Panel.fit(
            "\n".join(
                [
                    f"Kafka bootstrap : {stack.bootstrap}",
                    f"S3 endpoint     : {stack.s3_endpoint}  (bucket {settings.s3_bucket})",
                    f"Env file        : {stack.layout.env_file}",
                    "Dagster UI      : make dagster-dev  ->  http://127.0.0.1:3000",
                    "Stop the stack  : .venv/bin/kappa stack down",
                ]
            ),
            title="where to look",
        )
    )


def main() -> None:
    try:
        step("1. local stack: real Kafka (KRaft) + S3Proxy")
        run("kappa stack up")
        apply_stack_env()
        step("2. smoke round trip")
        smoke_round_trip()
        where_to_look(Stack())
    except KappaError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
