"""Resources: Kafka settings and the stock dagster-aws S3 resource, both from one config module.

Values come from ``workers.config`` (environment, else the local stack's env file). Secrets are
passed as ``EnvVar`` so the Dagster UI never shows them.
"""

from __future__ import annotations

import dagster as dg
from dagster_aws.s3 import S3Resource

from workers.config import Settings, apply_stack_env, kafka_passthrough, load_settings


class KafkaResource(dg.ConfigurableResource):
    """Kafka connection: bootstrap servers plus librdkafka pass-through settings from ``KAPPA_KAFKA_*``."""

    bootstrap_servers: str
    s3_bucket: str = "kappa"

    def settings(self) -> Settings:
        """Full runtime settings (S3 endpoint and credentials come from the environment)."""
        import os

        apply_stack_env()
        env = {**os.environ, "KAPPA_BOOTSTRAP_SERVERS": self.bootstrap_servers, "KAPPA_S3_BUCKET": self.s3_bucket}
        return load_settings(env)

    def client_config(self, **overrides: object) -> dict[str, object]:
        import os

        return {"bootstrap.servers": self.bootstrap_servers, **kafka_passthrough(os.environ), **overrides}


def _env_or_none(name: str) -> dg.EnvVar | None:
    import os

    return dg.EnvVar(name) if os.environ.get(name) else None


def build_resources() -> dict[str, object]:
    apply_stack_env()
    import os

    bootstrap = os.environ.get("KAPPA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    bucket = os.environ.get("KAPPA_S3_BUCKET", "kappa")
    return {
        "kafka": KafkaResource(bootstrap_servers=bootstrap, s3_bucket=bucket),
        "s3": S3Resource(
            endpoint_url=os.environ.get("KAPPA_S3_ENDPOINT_URL") or None,
            region_name=os.environ.get("AWS_REGION", "us-east-1"),
            aws_access_key_id=_env_or_none("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=_env_or_none("AWS_SECRET_ACCESS_KEY"),
        ),
    }


defs = dg.Definitions(resources=build_resources())


class ReplayOptions(dg.ConfigurableResource):
    """Run-level replay options, settable per run with ``resources: {replay: {config: {...}}}``.

    ``version``/``pipeline`` left unset fall back to the ``kappa/version``/``kappa/pipeline`` run tags,
    then to orders v2 (see ``kappa_dagster.replay_target``).
    """

    pipeline: str | None = None
    version: int | None = None
    partitions: int | None = None  # None: mirror the source partitions (see workers.replay.loader)
    throttle: float | None = None
    cleanup: bool = True
    force: bool = False
    live_version: int | None = None
    #: Extra ``kappa processor`` options for the replay consumer, e.g. ``"--batch-size 2000"``.
    processor_args: str = ""
    #: A second run of the same (pipeline, version, day) waits this long for the first, then fails.
    lease_wait_seconds: float = 0.0
    #: The run's hold on its day expires this long after its last renewal (renewed every third of it).
    lease_ttl_seconds: float = 120.0


defs = dg.Definitions.merge(
    defs,
    dg.Definitions(
        resources={"replay": ReplayOptions.configure_at_launch(), "pipes_subprocess_client": dg.PipesSubprocessClient()}
    ),
)
