"""The wire contract's stubs are derived from the .proto, and the torch-free parts stay torch-free."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "protos"))

import generate  # noqa: E402  (protos/generate.py)

# Lines that record which protoc / grpcio-tools wrote the file, not what the .proto says.
TOOL_VERSION_LINES = re.compile(r"^(# Protobuf Python Version:.*|GRPC_GENERATED_VERSION = .*)$")


def _content(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    if path.name.endswith("_pb2.py"):
        # The runtime-version check names the protoc version it was generated with (major/minor/patch).
        text = "\n".join(lines)
        text = re.sub(r"ValidateProtobufRuntimeVersion\([^)]*\)", "ValidateProtobufRuntimeVersion(...)", text)
        lines = text.splitlines()
    return [line for line in lines if not TOOL_VERSION_LINES.match(line)]


def test_checked_in_stubs_match_the_proto(tmp_path):
    written = generate.generate(tmp_path)
    assert written, "no stubs generated"
    checked_in_root = REPO / "services"
    for rel in written:
        fresh, checked_in = tmp_path / rel, checked_in_root / rel
        assert checked_in.exists(), f"{rel} is not checked in: run `make proto`"
        assert _content(fresh) == _content(checked_in), f"{rel} drifted from protos/: run `make proto`"


def test_every_proto_is_generated():
    protos = {p.stem for p in generate.proto_files()}
    stubs = {p.name.removesuffix("_pb2.py") for p in (REPO / "services/sinkserve/v1").glob("*_pb2.py")}
    assert protos == stubs


def test_gateway_client_and_cli_do_not_import_torch():
    code = (
        "import sys\n"
        "import sinkserve.gateway.server, sinkserve.gateway.main, sinkserve.gateway.backend\n"
        "import sinkserve.gateway.convert, sinkserve.gateway.interceptors, sinkserve.gateway.limits\n"
        "import sinkserve.routing.request_router, sinkserve.client, sinkserve.cli_serving, sinkserve.cli\n"
        "import sinkserve.errors, sinkserve.protocol, sinkserve.replica\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"torch-free modules imported: {result.stdout.strip()}"
