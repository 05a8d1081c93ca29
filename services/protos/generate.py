"""Regenerate the Python stubs of proto/tandem/v1/tandem.proto (`make proto`).

The stubs are checked in under services/protos/tandem/v1/ so that running tandem needs no
protoc; tests/service/test_proto_stubs.py regenerates them into a temporary folder and fails
when the checked-in files differ (someone edited the .proto without regenerating).

protoc writes `from tandem.v1 import tandem_pb2` into the gRPC module, which only works
with the output folder on sys.path; the import is rewritten to a relative one so the stubs
live inside the `services` package.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ["tandem/v1/tandem.proto"]
OUT = Path(__file__).resolve().parent  # services/protos


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into out_dir (which gets tandem/v1/...); return the files written."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(PROTO_ROOT / f) for f in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(PROTO_FILES))
    written = []
    for path in sorted((out_dir / "tandem").rglob("*.py*")):
        text = path.read_text()
        text = text.replace("from tandem.v1 import tandem_pb2", "from . import tandem_pb2")
        path.write_text(text)
        written.append(path)
    for pkg in (out_dir / "tandem", out_dir / "tandem" / "v1"):
        (pkg / "__init__.py").touch()
    return written


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        for f in files:
            dest = OUT / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(f.read_text())
            print(f"wrote {dest.relative_to(ROOT)}")
    for pkg in (OUT / "tandem", OUT / "tandem" / "v1"):
        (pkg / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
