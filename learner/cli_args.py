"""Command-line options made from the config dataclasses: defaults, then `--config FILE.json`, then `--field value`.

Every field of a step's config is an option, `--max_seq_len` and `--max-seq-len` alike; the nested
DeepSpeed and LoRA options are flat (`--zero_stage 3`, `--lora_dim 8`) as in DeepSpeed-Chat's scripts,
and nested or flat in the JSON file. Booleans take `--flag`, `--flag true` or `--flag false`; lists take
several values (`--data a b`). Every error is a ConfigError naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from common.errors import ConfigError
from learner.config import CONFIGS, CommonConfig

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def nested_fields(cls) -> dict[str, type]:
    """The dataclass fields that are themselves dataclasses (deepspeed, lora): name -> class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def flat_fields(cls) -> dict[str, tuple[str | None, type]]:
    """Every leaf option: name -> (the nested field holding it or None, its type)."""
    hints, out = typing.get_type_hints(cls), {}
    nested = nested_fields(cls)
    for f in dataclasses.fields(cls):
        if f.name in nested:
            sub_hints = typing.get_type_hints(nested[f.name])
            for sub in dataclasses.fields(nested[f.name]):
                out[sub.name] = (f.name, sub_hints[sub.name])
        else:
            out[f.name] = (None, hints[f.name])
    return out


def coerce(name: str, kind: type, value):
    """Convert a JSON or command-line value to the field's type, or raise ConfigError(name)."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in TRUE:
                return True
            if str(value).lower() in FALSE:
                return False
            raise ValueError
        if typing.get_origin(kind) is list:
            items = value if isinstance(value, list) else [value]
            return [str(v) for v in items]
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(name, f"unsupported option type {kind}")
    type_name = "list of strings" if typing.get_origin(kind) is list else getattr(kind, "__name__", str(kind))
    raise ConfigError(name, f"expected {type_name}, got {value!r}")


def build_parser(step: str, prog: str | None = None) -> argparse.ArgumentParser:
    """Options of one step (every value defaults to 'not given', so the JSON file's values survive)."""
    parser = argparse.ArgumentParser(prog=prog or f"python -m learner {step}", argument_default=argparse.SUPPRESS,
                                     description=f"Learner step {step!r}: every config field is an option.")
    parser.add_argument("--config", help="JSON file of options (flat, or nested under 'deepspeed' / 'lora')")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    defaults = CONFIGS[step]()
    for name, (owner, kind) in flat_fields(CONFIGS[step]).items():
        default = getattr(getattr(defaults, owner) if owner else defaults, name)
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        help_text = f"default: {default!r}"
        if kind is bool:
            parser.add_argument(*flags, dest=name, nargs="?", const="true", metavar="BOOL", help=help_text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(*flags, dest=name, nargs="+", metavar="SPEC", help=help_text)
        else:
            parser.add_argument(*flags, dest=name, metavar=kind.__name__.upper(), help=help_text)
    return parser


def read_json_config(path: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError("config", f"cannot read {path!r}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError("config", f"{path!r} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError("config", f"{path!r} must hold a JSON object of options")
    return doc


def flatten(doc: dict, cls) -> dict:
    """A JSON config with 'deepspeed' / 'lora' sections made flat; unknown keys raise ConfigError."""
    nested, fields, out = nested_fields(cls), flat_fields(cls), {}
    for key, value in doc.items():
        if key in nested and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if fields.get(sub_key, (None,))[0] != key:
                    raise ConfigError(f"{key}.{sub_key}", "unknown option")
                out[sub_key] = sub_value
        elif key in fields:
            out[key] = value
        else:
            raise ConfigError(key, f"unknown option for {cls.__name__}")
    return out


def make_config(step: str, values: dict, validate: bool = True) -> CommonConfig:
    """A step's config from flat option values (already merged), coerced and validated."""
    if step not in CONFIGS:
        raise ConfigError("step", f"must be one of {', '.join(CONFIGS)}, got {step!r}")
    cls = CONFIGS[step]
    config, fields = cls(), flat_fields(cls)
    for name, value in flatten(values, cls).items():
        owner, kind = fields[name]
        setattr(getattr(config, owner) if owner else config, name, coerce(name, kind, value))
    return config.validate() if validate else config


def parse_config(step: str, argv: list[str], prog: str | None = None) -> CommonConfig:
    """Defaults < --config FILE < command-line options; validated."""
    args = vars(build_parser(step, prog).parse_args(argv))
    args.pop("local_rank", None)
    values = read_json_config(args.pop("config")) if "config" in args else {}
    values = flatten(values, CONFIGS[step]) if step in CONFIGS else values
    values.update(args)
    return make_config(step, values)
