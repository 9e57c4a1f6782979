"""Resources: one ``KappaResource`` that becomes the workers' ``Settings``, and the run's replay options.

Nothing is read at import; ``workers.config`` owns every default. The S3 client is the workers' own
(dagster-aws's ``S3Resource`` cannot carry its timeouts and retry mode, and a step must behave as
the worker it drives).
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from workers import s3 as s3_helpers
from workers.config import Settings, environment, load_settings

#: Resource field -> the variable ``workers.config`` reads it from (which owns the defaults).
FIELD_VARIABLES = {
    "bootstrap_servers": "KAPPA_BOOTSTRAP_SERVERS",
    "s3_endpoint_url": "KAPPA_S3_ENDPOINT_URL",
    "s3_bucket": "KAPPA_S3_BUCKET",
    "events_topic": "KAPPA_EVENTS_TOPIC",
    "group_prefix": "KAPPA_GROUP_PREFIX",
}


class KappaResource(dg.ConfigurableResource):
    """Where Kafka and S3 are and which bucket and topics to use: one ``workers.config.Settings``.

    A field left unset is decided as for every worker: the environment, else the local stack's env
    file, else ``workers.config``'s default; a field set (literal or ``dg.EnvVar``) wins. Credentials
    are no fields: they stay in the environment, so the UI never shows them.
    """

    bootstrap_servers: str | None = None
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    events_topic: str | None = None
    #: first part of the consumer groups the runs name (replay groups): keeps deployments apart
    group_prefix: str | None = None

    def environment(self) -> dict[str, str]:
        """The variables the settings are read from; also the environment of the subprocesses it starts."""
        fields = {variable: getattr(self, name) for name, variable in FIELD_VARIABLES.items()}
        # a field set, even empty, is the setting (an empty topic is refused as in the environment)
        return {**environment(), **{variable: value for variable, value in fields.items() if value is not None}}

    def settings(self) -> Settings:
        return load_settings(self.environment())

    def s3_client(self, settings: Settings | None = None) -> Any:
        """The workers' S3 client (same endpoint, credentials, timeouts and retries)."""
        return s3_helpers.s3_client(settings or self.settings())


def build_resources() -> dict[str, Any]:
    """Every resource of the code location; nothing is read from the environment until a run uses them."""
    return {
        "kappa": KappaResource(),
        "replay": ReplayOptions.configure_at_launch(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }


class ReplayOptions(dg.ConfigurableResource):
    """Run-level replay options, settable per run with ``resources: {replay: {config: {...}}}``.

    ``version``/``pipeline`` left unset fall back to the ``kappa/version``/``kappa/pipeline`` run tags,
    then to orders v2 (see ``kappa_dagster.replay.target``).
    """

    pipeline: str | None = None
    version: int | None = None
    partitions: int | None = None  # None: mirror the source partitions (see workers.replay.loader)
    throttle: float | None = None
    cleanup: bool = True
    force: bool = False
    live_version: int | None = None
    #: Processes in the replay group (``workers.replay.consume``): the topic's partitions spread over them.
    consumers: int = 1
    #: Extra ``kappa processor`` options for the replay consumer, e.g. ``"--batch-size 2000"``.
    processor_args: str = ""
    #: A second run of the same (pipeline, version, day) waits this long for the first, then fails.
    lease_wait_seconds: float = 0.0
    #: The run's hold on its day expires this long after its last renewal (renewed every third of it).
    lease_ttl_seconds: float = 120.0


defs = dg.Definitions(resources=build_resources())
