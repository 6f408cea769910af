"""The push credential: a shared token that every PushWeights call must carry, and optional TLS.

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


def server_credentials(cert_file: str | Path, key_file: str | Path) -> grpc.ServerCredentials:
    """TLS for the server (`server.add_secure_port(address, server_credentials(...))`)."""
    try:
        cert, key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    except OSError as exc:
        raise ConfigError("tls_cert", f"cannot read the TLS certificate or key: {exc}") from None
    return grpc.ssl_server_credentials([(key, cert)])


def channel_credentials(ca_file: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS for a client (`grpc.secure_channel(target, channel_credentials(ca))`); the system roots without ca_file."""
    try:
        roots = Path(ca_file).read_bytes() if ca_file else None
    except OSError as exc:
        raise ConfigError("tls_ca", f"cannot read the CA certificate: {exc}") from None
    return grpc.ssl_channel_credentials(root_certificates=roots)
