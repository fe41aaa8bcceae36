"""Regenerate `services/gen/` from `proto/`: Python messages, gRPC stubs and type stubs.

Generated imports (`from p2pgrid.x.v1 import y_pb2`) are rewritten to the
package root (`from services.gen.p2pgrid.x.v1 import y_pb2`) and every file is
headed do-not-edit. `--out DIR` writes elsewhere, which the staleness test uses.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
HEADER = "# Generated from proto/ by scripts/gen_protos.py (make proto). DO NOT EDIT.\n"
_IMPORT = re.compile(r"^(from|import) p2pgrid(\.| )", re.MULTILINE)


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    bindir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "__init__.py").write_text(HEADER + '"""Generated protobuf code."""\n')
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_dir():
                continue
            rel = path.relative_to(tmp)
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            text = _IMPORT.sub(lambda m: f"{m.group(1)} services.gen.p2pgrid{m.group(2)}", path.read_text())
            target.write_text(HEADER + text)
        for directory in sorted({p.parent for p in out_dir.rglob("*.py")} | {out_dir / "p2pgrid"}):
            current = directory
            while current != out_dir.parent and current != out_dir:
                init = current / "__init__.py"
                if not init.exists():
                    init.write_text(HEADER)
                current = current.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "services" / "gen")
    args = parser.parse_args()
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
