"""`tandem promote CHECKPOINT --server HOST:PORT`: push a saved checkpoint to a running server.

CHECKPOINT is a full HF folder (config.json + safetensors/bin) or, with --lora (or when the folder has an
adapter_config.json), a peft LoRA adapter folder. The push needs the server's token: --token-file F or
the TANDEM_PUSH_TOKEN environment variable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import add_server_option
from cli.common import credentials as tls_credentials

QUANTIZE = {"none": None, "int8": "int8", "int4": "int4"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("promote", help="push a saved checkpoint to a running server",
                              description=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="HF model folder or LoRA adapter folder")
    add_server_option(p)
    p.add_argument("--quantize", default="none", choices=tuple(QUANTIZE),
                   help="blockwise quantization on the wire (default: %(default)s)")
    p.add_argument("--bf16", action="store_true", help="send bfloat16 instead of float32 (when not quantized)")
    p.add_argument("--block-size", type=int, default=256, metavar="N", help="quantization block (default: %(default)s)")
    p.add_argument("--lora", action="store_true", help="CHECKPOINT is a LoRA adapter folder")
    p.add_argument("--token-file", default=None, metavar="F", help="file holding the push token "
                                                                    "(default: $TANDEM_PUSH_TOKEN)")
    p.add_argument("--version", type=int, default=None, metavar="N",
                   help="version to install (default: the server's version + 1)")
    p.add_argument("--origin", default=None, help="origin shown by `tandem status` (default: the folder)")
    p.set_defaults(run=run, parser=p)
    return p


register = add_parser   # the name cli/main.py calls


def run(args: argparse.Namespace) -> int:
    from clients.weight_push import hf_tensors, lora_adapter, push_weights
    from common.errors import FieldError
    from protos.auth import read_token

    parser: argparse.ArgumentParser | None = getattr(args, "parser", None)

    def usage_error(message: str) -> int:
        if parser is not None:
            parser.error(message)           # exits 2
        print(f"tandem promote: {message}", file=sys.stderr)
        return 2

    folder = Path(args.checkpoint)
    if not folder.is_dir():
        return usage_error(f"CHECKPOINT: no such folder: {folder}")
    if args.block_size < 2 or args.block_size % 2:
        return usage_error(f"--block-size: must be an even number >= 2, got {args.block_size}")
    if args.bf16 and args.quantize != "none":
        return usage_error("--bf16: cannot be combined with --quantize int8/int4")
    encoding = QUANTIZE[args.quantize] or ("bfloat16" if args.bf16 else "float32")
    lora = args.lora or (folder / "adapter_config.json").is_file()
    try:
        token = read_token(args.token_file, field="token_file")
        credentials = tls_credentials(args)
        if lora:
            tensors, scale = lora_adapter(folder)
            named, count = tensors, len(tensors)
        else:
            named, scale = hf_tensors(folder), 0.0
            count = 0
        if token is None:
            return usage_error("--token-file: no push token (give --token-file F or set TANDEM_PUSH_TOKEN)")
        report = push_weights(args.server, named, token=token, version=args.version,
                              origin=args.origin or str(folder.resolve()), encoding=encoding,
                              block_size=args.block_size, lora=lora, lora_scale=scale, num_tensors=count,
                              timeout=args.timeout, credentials=credentials)
    except FieldError as err:
        option = {"checkpoint": "CHECKPOINT", "token_file": "--token-file"}.get(err.field, "--" + err.field.replace("_", "-"))
        return usage_error(f"{option}: {err.message}")
    print(f"promoted {folder} to {args.server}: version {report.version} in force "
          f"({'LoRA' if lora else 'full'}, {report.tensors} tensors, {encoding}, "
          f"{report.bytes_sent / 2**20:.2f} MiB sent, push {report.push_s:.2f} s, swap {report.swap_s * 1e3:.1f} ms)")
    return 0
