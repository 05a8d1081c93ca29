"""Regenerate the Python stubs of proto/tandem/v1/tandem.proto (`make proto`).

The stubs are checked in beside the .proto (proto/tandem/v1/tandem_pb2*.py), which the
package maps to the Python package `tandem.v1` (pyproject.toml), so protoc's own imports
(`from tandem.v1 import tandem_pb2`) work unchanged and the wheel carries the .proto too.
Running tandem needs no protoc; tests/service/test_proto_stubs.py regenerates the stubs
into a temporary folder and fails when the checked-in files differ (someone edited the
.proto without regenerating).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ["tandem/v1/tandem.proto"]
OUT = PROTO_ROOT  # the stubs live beside the .proto: proto/tandem/v1/


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
    (out_dir / "tandem" / "v1" / "__init__.py").touch()  # `tandem` itself stays a namespace
    return sorted(p for p in (out_dir / "tandem").rglob("*.py*"))


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for f in generate(Path(tmp)):
            dest = OUT / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(f.read_text())
            print(f"wrote {dest.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
