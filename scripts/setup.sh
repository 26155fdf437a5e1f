#!/usr/bin/env bash
# Create .venv/ at the repository root and install carspotter into it (idempotent).
# Also installs Debian's chromium for the browser tests when run as root and it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# The exact pins matter: a looser torch pulls several GB of CUDA wheels from the registry.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e '.[serve,export,dev]' 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import carspotter, torch, timm, faiss; print('carspotter', carspotter.__version__, '| torch', torch.__version__)"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser tests…"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; browser tests will be skipped" >&2
  else
    echo "note: chromium not found; browser tests will be skipped (apt-get install chromium)" >&2
  fi
fi
