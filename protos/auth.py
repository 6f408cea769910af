"""The push credential (a shared token that every PushWeights call must carry) and TLS for servers and clients.

The server reads the token from a file (`--push-token-file`) or the environment (`TANDEM_PUSH_TOKEN`);
a pusher sends it as gRPC metadata `authorization: Bearer <token>`. The comparison is constant-time.
A server with no token configured refuses every push: weights are never writable by default.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.errors import ConfigError

TOKEN_ENV = "TANDEM_PUSH_TOKEN"
METADATA_KEY = "authorization"
SCHEME = "Bearer "
NOT_CONFIGURED = (f"weight pushes are disabled: this server has no push token; start it with "
                  f"--push-token-file FILE or set {TOKEN_ENV}")


def read_token(token_file: str | Path | None = None, env: dict | None = None, field: str = "push_token_file") -> str | None:
    """The token from `token_file` (stripped) or else the TANDEM_PUSH_TOKEN variable; None when neither is set."""
    env = os.environ if env is None else env
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(field, f"cannot read the token file {str(path)!r}: {exc.strerror or exc}") from None
        if not token:
            raise ConfigError(field, f"the token file {str(path)!r} is empty")
        return token
    token = env.get(TOKEN_ENV, "").strip()
    return token or None


def bearer_metadata(token: str | None) -> list[tuple[str, str]]:
    """The call metadata a pusher sends (empty without a token: the server then answers UNAUTHENTICATED)."""
    return [(METADATA_KEY, SCHEME + token)] if token else []


@dataclass
class PushAuth:
    """Checks the bearer token of an incoming call."""

    token: str | None

    @classmethod
    def from_sources(cls, token_file: str | Path | None = None, env: dict | None = None) -> PushAuth:
        return cls(read_token(token_file, env))

    @property
    def enabled(self) -> bool:
        return bool(self.token)

    def failure(self, metadata) -> str | None:
        """Why the call is refused (None when its token is right). `metadata`: (key, value) pairs."""
        if not self.token:
            return NOT_CONFIGURED
        values = [value for key, value in (metadata or ()) if key.lower() == METADATA_KEY]
        if not values:
            return f"missing credential: send metadata '{METADATA_KEY}: {SCHEME}<token>'"
        sent = values[0]
        sent = sent.decode() if isinstance(sent, bytes) else sent
        if not sent.startswith(SCHEME):
            return f"bad credential: '{METADATA_KEY}' must be '{SCHEME}<token>'"
        if not hmac.compare_digest(sent[len(SCHEME):].encode(), self.token.encode()):
            return "bad credential: wrong push token"
        return None

    def check(self, context: grpc.ServicerContext) -> None:
        """Abort the call with UNAUTHENTICATED unless it carries the right token."""
        reason = self.failure(context.invocation_metadata())
        if reason is not None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)


@dataclass
class ServerTLS:
    """TLS for a gRPC server: its certificate and key; with `client_ca_file`, clients must present a
    certificate signed by that CA (mutual TLS). All None: plaintext (the loopback default)."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def validate(self) -> ServerTLS:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("tls_cert" if not self.cert_file else "tls_key",
                              "TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("tls_client_ca", "client certificates need the server's own TLS (--tls-cert, --tls-key)")
        if self.enabled:
            self.credentials()                       # unreadable files: a clear error at start, not at bind
        return self

    def credentials(self) -> grpc.ServerCredentials:
        cert, key = _read(self.cert_file, "tls_cert"), _read(self.key_file, "tls_key")
        client_ca = _read(self.client_ca_file, "tls_client_ca") if self.client_ca_file else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)


def add_port(server: grpc.Server, address: str, tls: ServerTLS | None) -> int:
    """Bind `address` with TLS when configured, else plaintext; the bound port (0 when it failed)."""
    if tls is not None and tls.enabled:
        return server.add_secure_port(address, tls.credentials())
    return server.add_insecure_port(address)


def channel_credentials(ca_file: str | Path | None = None, cert_file: str | Path | None = None,
                        key_file: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS for a client: trust `ca_file` (the system roots without it); with cert and key, present them
    (a server that requires client certificates)."""
    if bool(cert_file) != bool(key_file):
        raise ConfigError("tls_cert" if not cert_file else "tls_key", "a client certificate needs its key and back")
    roots = _read(ca_file, "tls_ca") if ca_file else None
    cert = _read(cert_file, "tls_cert") if cert_file else None
    key = _read(key_file, "tls_key") if key_file else None
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=cert)


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None, options=None) -> grpc.Channel:
    """A channel to `target`: TLS with `credentials`, else plaintext."""
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)


def _read(path: str | Path, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
