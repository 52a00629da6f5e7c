"""Kafka client options derived from :class:`~streams.settings.Settings`.

Security settings (SSL, SASL PLAIN/SCRAM) are passed through unchanged to the
three clients the project uses -- faust (the worker), aiokafka (admin, bench)
and kafka-python (the producer and subscriber clients) -- so one set of env
vars configures them all.  No Kafka client is imported here: the producer and
subscriber clients use this module without faust installed (faust's
credentials are built in streams/service/app.py).
"""

from __future__ import annotations

import ssl
from typing import Any

from ..settings import Settings


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    ctx = ssl.create_default_context(cafile=settings.ssl_cafile or None)
    if settings.ssl_certfile:
        ctx.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile or None,
                            password=settings.ssl_key_password or None)
    return ctx


def aiokafka_options(settings: Settings) -> dict[str, Any]:
    """Connection + security kwargs for aiokafka clients."""
    opts: dict[str, Any] = {"bootstrap_servers": settings.bootstrap_servers,
                            "security_protocol": settings.security_protocol}
    ctx = ssl_context(settings)
    if ctx is not None:
        opts["ssl_context"] = ctx
    if settings.security_protocol.startswith("SASL"):
        opts.update(sasl_mechanism=settings.sasl_mechanism, sasl_plain_username=settings.sasl_username,
                    sasl_plain_password=settings.sasl_password)
    return opts


def kafka_python_options(settings: Settings) -> dict[str, Any]:
    """Connection + security kwargs for kafka-python clients."""
    opts: dict[str, Any] = {"bootstrap_servers": settings.bootstrap_servers.split(","),
                            "security_protocol": settings.security_protocol}
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        opts.update(ssl_cafile=settings.ssl_cafile or None, ssl_certfile=settings.ssl_certfile or None,
                    ssl_keyfile=settings.ssl_keyfile or None, ssl_password=settings.ssl_key_password or None)
    if settings.security_protocol.startswith("SASL"):
        opts.update(sasl_mechanism=settings.sasl_mechanism, sasl_plain_username=settings.sasl_username,
                    sasl_plain_password=settings.sasl_password)
    return opts
