"""Generate the Python gRPC stubs from protos/ (run by `make proto`; the drift test runs it too).

Output goes to services/sinkserve/v1/ (package ``sinkserve.v1``): protoc names the generated modules after
the .proto's path, so `protos/sinkserve/v1/sinkserve.proto` becomes `sinkserve.v1.sinkserve_pb2` and the
generated imports resolve without rewriting.

    python protos/generate.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "services"
INIT_TEXT = '"""Generated gRPC stubs for sinkserve.v1 (from protos/; do not edit, run `make proto`)."""\n'


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs under ``out_dir`` and return the files written (relative to ``out_dir``)."""
    from grpc_tools import protoc

    import grpc_tools

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for proto in protos:
        package_dir = out_dir / Path(proto).parent
        init = package_dir / "__init__.py"
        init.write_text(INIT_TEXT)
        stem = Path(proto).stem
        for name in ("__init__.py", f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"):
            written.append((package_dir / name).relative_to(out_dir))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: services/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(args.out / path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
