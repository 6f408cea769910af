"""Regenerate the Python gRPC code from protos/tandem.proto.

    python -m protos.regenerate            # write protos/tandem_pb2*.py(i)
    python -m protos.regenerate --check    # exit 1 when the committed code is stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py")


def generate(out_root: Path) -> Path:
    """Run protoc with the repository root as include path, so imports read `from protos import ...`."""
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(ROOT / "protos" / "tandem.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on protos/tandem.proto")
    return out_root / "protos"


def stale_files() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [name for name in GENERATED
                if not (ROOT / "protos" / name).exists()
                or not filecmp.cmp(fresh / name, ROOT / "protos" / name, shallow=False)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the generated code is current")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code: " + ", ".join(stale) + " (run python -m protos.regenerate)")
            return 1
        print("generated code is current")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        for name in GENERATED:
            shutil.copyfile(fresh / name, ROOT / "protos" / name)
    print("wrote " + ", ".join(GENERATED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
