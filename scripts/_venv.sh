# Sourced by scripts/serve and scripts/test: make .venv (Python >= 3.11) and install what $1 needs.
# Re-installs only when pyproject.toml (or the example plugin's) changed since the last install.
set -euo pipefail
what="${1:-runtime}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "extsvc needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=".venv/.installed-$what"
want="$(cat pyproject.toml examples/*/pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ "$what" = test ]; then
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    for example in examples/*/pyproject.toml; do
      [ -e "$example" ] && .venv/bin/python -m pip install --quiet -e "$(dirname "$example")"
    done
  else
    .venv/bin/python -m pip install --quiet -e .
  fi
  echo "$want" > "$stamp"
fi
