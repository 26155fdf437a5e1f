#!/usr/bin/env bash
# Create .venv/ at the repository root and install carspotter into it (idempotent).
# Also installs Debian's chromium for the browser tests when run as root and it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# No wheel cache: the venv alone is ~6.7 GB (torch's CUDA build), and a second copy of each download in
# ~/.cache/pip is what a small disk cannot spare.
export PIP_NO_CACHE_DIR=1

# pip, quietly, but failing loudly: a failed install stops here with pip's own message, instead of a
# "No module named carspotter" further down.
pip_install() {
  local log
  log="$(mktemp)"
  if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then
    grep -v "is ignored" "$log" >&2 || true
    rm -f "$log"
    echo "setup.sh: 'pip install $*' failed (message above); free disk: $(df -h . | awk 'NR==2 {print $4}')" >&2
    exit 1
  fi
  grep -v "is ignored" "$log" || true
  rm -f "$log"
}

pip_install --retries 10 --timeout 60 --upgrade pip
# A dropped connection mid-download is retried rather than failing the whole setup (pip >= 25.1).
RETRY=(--retries 10 --timeout 60 --resume-retries 10)
# The exact pins matter: a looser torch pulls several GB of CUDA wheels from the registry.
pip_install "${RETRY[@]}" torch==2.14.1 torchvision==0.29.1
pip_install "${RETRY[@]}" -e '.[serve,export,dev]'
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
