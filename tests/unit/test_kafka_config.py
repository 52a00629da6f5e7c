"""SASL_SSL with SCRAM-SHA-512: one set of env vars configures all three Kafka clients alike.

No secured broker runs in the tests, so this checks what each client is
handed -- through the clients' own option tables and constructors, so a
misspelt option fails here rather than at a customer's cluster.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from kafka import KafkaConsumer, KafkaProducer

from streams.service.app import faust_config
from streams.kafka.client_config import aiokafka_options, kafka_python_options
from streams.settings import Settings


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away self-signed CA certificate (openssl), so the SSL context really loads a file."""
    tmp = tmp_path_factory.mktemp("ca")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
                    "-keyout", str(tmp / "ca.key"), "-out", str(tmp / "ca.pem")],
                   check=True, capture_output=True, timeout=60)
    return tmp / "ca.pem"


@pytest.fixture
def settings(ca_file: Path) -> Settings:
    return Settings.from_env({
        "KAFKA_BOOTSTRAP_SERVERS": "b1:9096,b2:9096",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "profilestream",
        "KAFKA_SASL_PASSWORD": "s3cret",
        "KAFKA_SSL_CAFILE": str(ca_file),
    })


def assert_verifies_brokers(ctx: object) -> None:
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert any(cert["subject"] == ((("commonName", "test-ca"),),) for cert in ctx.get_ca_certs())


def test_faust_gets_sasl_ssl_scram_512_credentials(settings: Settings) -> None:
    credentials = faust_config(settings)["broker_credentials"]
    assert credentials is not None
    auth = credentials_to_aiokafka_auth(credentials)  # what faust hands its aiokafka clients
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("profilestream", "s3cret")
    assert_verifies_brokers(auth["ssl_context"])
    assert faust_config(settings)["broker"] == ["kafka://b1:9096", "kafka://b2:9096"]


def test_aiokafka_gets_sasl_ssl_scram_512_options(settings: Settings) -> None:
    for opts in (aiokafka_options(settings),):
        assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
        assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("profilestream", "s3cret")
        assert_verifies_brokers(opts["ssl_context"])

    async def construct() -> None:
        """The constructors validate the options without connecting: they take ours, and refuse
        the same options with a mechanism they do not know (so taking them means something)."""
        for client in (AIOKafkaConsumer, AIOKafkaProducer):
            client(**aiokafka_options(settings))
            with pytest.raises(ValueError, match="sasl_mechanism"):
                client(**{**aiokafka_options(settings), "sasl_mechanism": "SCRAM-SHA-0"})
    asyncio.run(construct())


def test_kafka_python_gets_sasl_ssl_scram_512_options(settings: Settings, ca_file: Path) -> None:
    for opts, client in ((kafka_python_options(settings), KafkaConsumer),
                         (kafka_python_options(settings), KafkaProducer)):
        assert set(opts) <= set(client.DEFAULT_CONFIG), set(opts) - set(client.DEFAULT_CONFIG)
        assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
        assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("profilestream", "s3cret")
        assert opts["ssl_cafile"] == str(ca_file)
        assert opts["bootstrap_servers"] == ["b1:9096", "b2:9096"]


def test_sasl_needs_a_mechanism() -> None:
    with pytest.raises(ValueError, match="KAFKA_SASL_MECHANISM"):
        Settings.from_env({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})

