"""The server's command-line options, shared by `tandem serve` and `python -m serving` (the one command
line a child server process is started with: see serving.launch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import ConfigError
from protos.auth import ServerTLS
from serving import limits
from serving.engine.config import DEVICES, DTYPES, EngineConfig

# EngineConfig / ServerConfig field -> the option that sets it, so errors name what the user typed.
OPTIONS = {
    "model": "--model", "tokenizer": "--tokenizer", "dtype": "--dtype", "device": "--device",
    "token_budget": "--token-budget", "block_size": "--block-size", "num_kv_blocks": "--kv-blocks",
    "max_num_seqs": "--max-num-seqs", "max_model_len": "--max-model-len", "host": "--host",
    "port": "--port", "grace_s": "--grace-period", "max_concurrent_rpcs": "--max-concurrent-rpcs",
    "push_token_file": "--push-token-file", "tp": "--tp", "replicas": "--replicas",
    "swap_timeout_s": "--swap-timeout", **limits.OPTIONS,
    "tls_cert": "--tls-cert", "tls_key": "--tls-key", "tls_client_ca": "--tls-client-ca",
    "http_port": "--http-port", "api_key_file": "--api-key-file", "metrics_port": "--metrics-port",
    "cpu_bind": "--cpu-bind",
}

DESCRIPTION = ("Load a local HF checkpoint and serve Generate/GenerateStream over gRPC. --port 0 picks a "
               "free port; the address is printed on stdout as `serving MODEL on HOST:PORT`.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH", help="local HF model folder")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer folder (default: the model's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0: pick a free port (default: %(default)s)")
    p.add_argument("--token-budget", type=int, default=256, metavar="N", help="tokens per forward pass")
    p.add_argument("--kv-blocks", type=int, default=0, metavar="N", help="KV-cache blocks (0: automatic)")
    p.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV-cache block")
    p.add_argument("--max-num-seqs", type=int, default=128, metavar="N", help="running sequences at most")
    p.add_argument("--max-model-len", type=int, default=0, metavar="N", help="context length (0: the model's)")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel ranks (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=1, metavar="R",
                   help="R engines behind this address, least-loaded routing (default: %(default)s)")
    p.add_argument("--grace-period", type=float, default=10.0, metavar="S",
                   help="seconds in-flight requests may run on after SIGINT/SIGTERM (default: %(default)s)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=256, metavar="N")
    p.add_argument("--push-token-file", default=None, metavar="FILE",
                   help="the credential PushWeights calls must carry (else $TANDEM_PUSH_TOKEN; "
                        "with neither, weight pushes are refused)")
    p.add_argument("--swap-timeout", type=float, default=30.0, metavar="S",
                   help="a weight swap waits at most S s for running requests, then ends them as aborted "
                        "(ABORTED) and swaps; new requests wait at most this long (default: %(default)s)")
    limits.add_arguments(p)
    add_tls_arguments(p)
    p.add_argument("--http-port", type=int, default=None, metavar="P",
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health, /metrics) on this port; 0 picks a free one (default: off)")
    p.add_argument("--cpu-bind", default="auto", metavar="auto|off|CORES",
                   help="CPU engines: run the engine thread on cores of its own and the gRPC/HTTP front on the "
                        "rest. auto: the first N cores when the engine's N torch threads leave one free; CORES: "
                        "the engine's cores, e.g. 0-3 (default: %(default)s; auto is off with --tp or --replicas)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="the HTTP front's API key: /v1/* then needs `Authorization: Bearer KEY`")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="a Prometheus /metrics endpoint of its own (the HTTP front serves /metrics too)")


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    """The gRPC front's TLS options (tandem serve and tandem balance)."""
    group = p.add_argument_group("TLS (off by default: plaintext, for loopback)")
    group.add_argument("--tls-cert", default=None, metavar="FILE", help="serve gRPC over TLS with this certificate (PEM)")
    group.add_argument("--tls-key", default=None, metavar="FILE", help="the certificate's private key (PEM)")
    group.add_argument("--tls-client-ca", default=None, metavar="FILE",
                       help="require client certificates signed by this CA (mutual TLS)")


def tls_config(args: argparse.Namespace) -> ServerTLS:
    return ServerTLS(cert_file=args.tls_cert, key_file=args.tls_key, client_ca_file=args.tls_client_ca)


def engine_argv(engine: EngineConfig) -> list[str]:
    """The options that rebuild `engine` in a child process (the inverse of `engine_config`)."""
    argv = ["--model", engine.model, "--dtype", engine.dtype, "--device", engine.device,
            "--token-budget", str(engine.token_budget), "--block-size", str(engine.block_size),
            "--kv-blocks", str(engine.num_kv_blocks), "--max-num-seqs", str(engine.max_num_seqs),
            "--max-model-len", str(engine.max_model_len)]
    if engine.tokenizer:
        argv += ["--tokenizer", engine.tokenizer]
    if not engine.enable_prefix_caching:
        argv.append("--no-prefix-caching")
    return argv


def server_argv(config) -> list[str]:
    """The per-server options of a serving.rpc.server.ServerConfig that every replica must share (limits,
    swap timeout, concurrency); address, ports and credentials are set per child."""
    return ["--max-concurrent-rpcs", str(config.max_concurrent_rpcs), "--swap-timeout", str(config.swap_timeout_s),
            *limits.to_argv(config.limits)]


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
        token_budget=args.token_budget, block_size=args.block_size, num_kv_blocks=args.kv_blocks,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Validate the options once, then serve until SIGINT/SIGTERM; a bad option exits 2 naming it."""
    from serving.rpc.server import ServerConfig, serve

    config = engine_config(args)
    server_config = ServerConfig(host=args.host, port=args.port, grace_s=args.grace_period,
                                 max_concurrent_rpcs=args.max_concurrent_rpcs,
                                 push_token_file=args.push_token_file, swap_timeout_s=args.swap_timeout,
                                 limits=limits.from_args(args), http_port=args.http_port,
                                 api_key_file=args.api_key_file, metrics_port=args.metrics_port,
                                 tls=tls_config(args), cpu_bind=args.cpu_bind)
    try:
        config.validate()
        server_config.validate()
        for name in ("model", "tokenizer"):
            path = getattr(config, name)
            if path is not None and not Path(path).is_dir():
                raise ConfigError(name, f"no such folder: {path}")
        if args.tp < 1:
            raise ConfigError("tp", f"must be >= 1, got {args.tp}")
        if args.replicas < 1:
            raise ConfigError("replicas", f"must be >= 1, got {args.replicas}")
        if (args.replicas > 1 or args.tp > 1) and (args.http_port is not None or args.metrics_port is not None):
            raise ConfigError("http_port" if args.http_port is not None else "metrics_port",
                              "the HTTP front and /metrics need --tp 1 --replicas 1 (for now)")
        if (args.replicas > 1 or args.tp > 1) and server_config.cpu_bind not in ("auto", "off"):
            # auto binds nothing there: a TP rank 0 never binds (GenerationServer), replicas start with it off
            raise ConfigError("cpu_bind", "a core list needs --tp 1 --replicas 1 (ranks and replicas would share it)")
        if args.replicas > 1:
            from serving.fleet.replicas import serve_replicas

            return serve_replicas(config, args.host, args.port, args.replicas, args.tp,
                                  args.push_token_file, args.grace_period, ready=_print_balancer_ready,
                                  server_options=server_argv(server_config), tls=server_config.tls)
        if args.tp > 1:
            from serving.parallel.serve import serve_tensor_parallel

            return serve_tensor_parallel(config, server_config, args.tp, ready=_print_ready)
        return serve(config, server_config, ready=_print_ready)
    except ConfigError as err:
        parser.error(f"{OPTIONS.get(err.field, err.field)}: {err.message}")   # exits 2


def _print_ready(server) -> None:
    if getattr(server, "http", None) is not None:
        print(f"openai-compatible http on http://{server.http.address}/v1", flush=True)
    if getattr(server, "metrics_port", 0):
        print(f"metrics on http://{server.config.host}:{server.metrics_port}/metrics", flush=True)
    print(f"serving {server.service.model_name} on {server.address}", flush=True)


def _print_balancer_ready(balancer) -> None:
    print(f"serving {len(balancer.replicas)} replicas on {balancer.address}", flush=True)
