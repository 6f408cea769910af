"""TLS on the real server (TinyStories-656K on 127.0.0.1): the SDK, weight pushes and the CLI over TLS,
plaintext refused by a TLS port, and mutual TLS refusing a client without a certificate."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clients.client import TandemClient
from clients.results import TandemError
from clients.weight_push import hf_tensors, push_weights
from common.errors import ConfigError
from protos.auth import ServerTLS, channel_credentials
from serving.engine.config import EngineConfig
from serving.rpc.server import ServerConfig, start_server
from tests.tls_certs import make_certs

TOKEN = "tls-test-token"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def serve(model, certs, tmp_path, *, mutual: bool):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    tls = ServerTLS(str(certs.server_cert), str(certs.server_key), str(certs.ca) if mutual else None)
    return start_server(EngineConfig(model=str(model), device="cpu", num_kv_blocks=128),
                        ServerConfig(port=0, push_token_file=str(token), tls=tls))


def test_the_sdk_pushes_and_the_cli_work_over_tls_and_plaintext_is_refused(tinystories_path, certs, tmp_path):
    server = serve(tinystories_path, certs, tmp_path, mutual=False)
    target = f"localhost:{server.port}"
    try:
        tls = channel_credentials(certs.ca)
        with TandemClient(target, timeout=60, credentials=tls) as client:
            [done] = client.generate("Once upon a time", max_new_tokens=8, temperature=0)
            assert len(done.token_ids) == 8
            report = push_weights(target, hf_tensors(tinystories_path), token=TOKEN, credentials=tls)
            assert client.status().weight_version == report.version == 1
        with TandemClient(target, timeout=10) as plain, pytest.raises(TandemError) as err:
            plain.generate("Once", max_new_tokens=2)
        assert err.value.code.name == "UNAVAILABLE"
        status = subprocess.run([sys.executable, "-m", "cli.main", "status", "--server", target, "--tls-ca",
                                 str(certs.ca), "--json"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and '"weight_version": 1' in status.stdout, status.stderr
    finally:
        server.stop(grace=1.0)


def test_mutual_tls_refuses_a_client_without_a_certificate(tinystories_path, certs, tmp_path):
    server = serve(tinystories_path, certs, tmp_path, mutual=True)
    target = f"localhost:{server.port}"
    try:
        with TandemClient(target, timeout=10, credentials=channel_credentials(certs.ca)) as anonymous:
            with pytest.raises(TandemError) as err:
                anonymous.status()
            assert err.value.code.name == "UNAVAILABLE"
        signed = channel_credentials(certs.ca, certs.client_cert, certs.client_key)
        with TandemClient(target, timeout=60, credentials=signed) as client:
            assert client.status().weight_version == 0
    finally:
        server.stop(grace=1.0)


def test_tls_options_are_checked_at_start(certs, tmp_path):
    with pytest.raises(ConfigError) as err:
        ServerTLS(cert_file=str(certs.server_cert)).validate()
    assert err.value.field == "tls_key"
    with pytest.raises(ConfigError) as err:
        ServerTLS(client_ca_file=str(certs.ca)).validate()
    assert err.value.field == "tls_client_ca"
    with pytest.raises(ConfigError) as err:
        ServerTLS(str(tmp_path / "missing.pem"), str(certs.server_key)).validate()
    assert err.value.field == "tls_cert" and "missing.pem" in err.value.message
