# Sourced by scripts/serve, demo, test and lock: make a virtualenv (Python >= 3.11) and install
# what $1 needs (runtime | demo | dev) from the lock file requirements/requirements-$1.txt, so a fresh clone
# gets exactly the tested versions. Re-installs only when a lock or pyproject.toml changed.
# Sets VENV (the virtualenv's folder).
#
# EXTSVC_DEPS=latest: use .venv-latest instead, with the newest versions pyproject.toml allows
# (no lock): `EXTSVC_DEPS=latest ./scripts/test` tries tomorrow's dependencies today.
set -euo pipefail
what="${1:-runtime}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "extsvc needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
say() { echo "extsvc: $*" >&2; }
latest=""
VENV=.venv
if [ "${EXTSVC_DEPS:-locked}" = latest ]; then latest=1; VENV=.venv-latest; fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV (Python $("$PYTHON" -c 'import platform; print(platform.python_version())'))"
  "$PYTHON" -m venv "$VENV"
fi
lock="requirements/requirements-$what.txt"
[ -e "$lock" ] || { echo "no lock file $lock (runtime, demo or dev)" >&2; exit 1; }
stamp="$VENV/.installed-$what"
want="$(cat "$lock" pyproject.toml examples/*/pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  extra="$what"; [ "$what" = runtime ] && extra=""
  editables=(-e ".${extra:+[$extra]}")
  if [ "$what" = dev ]; then
    for example in examples/*/pyproject.toml; do
      [ -e "$example" ] && editables+=(-e "$(dirname "$example")")
    done
  fi
  # pip's own progress lines, minus the noise of unreachable mirror locations, on stderr
  # (stdout is the server's: its decision records)
  quiet() {
    grep --line-buffered -vE '^WARNING: Location .* is ignored|^Requirement already satisfied|^Looking in|^Ignoring |^Obtaining |^ *(Checking if|Preparing|Building|Created wheel|Stored in|Attempting uninstall|Found existing|Uninstalling|Successfully uninstalled|Successfully built)|^$' >&2 || true
  }
  if [ -n "$latest" ]; then
    say "installing the newest allowed versions ($what) into $VENV"
    "$VENV/bin/python" -m pip install --upgrade pip 2>&1 | quiet
    "$VENV/bin/python" -m pip install --upgrade --upgrade-strategy eager "${editables[@]}" 2>&1 | quiet
    for owner in $(grep -v '^#' scripts/shared-paths); do  # those installed, again, last
      if "$VENV/bin/python" -m pip show -q "$owner" >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip install --no-deps --force-reinstall "$owner" 2>&1 | quiet
      fi
    done
  else
    say "installing $(grep -c '^[a-z0-9]' "$lock") locked packages from $lock into $VENV" \
        "(the first time takes a minute or so)"
    "$VENV/bin/python" -m pip install --require-hashes --no-deps -r "$lock" 2>&1 | quiet
    "$VENV/bin/python" -m pip install --no-deps --no-build-isolation "${editables[@]}" 2>&1 | quiet
    # the owners of the module paths xds-protos also ships go in last (scripts/shared-paths)
    owners="$(mktemp)"
    scripts/lock-entries "$lock" $(grep -v '^#' scripts/shared-paths) > "$owners" 2>/dev/null
    "$VENV/bin/python" -m pip install --require-hashes --no-deps --force-reinstall -r "$owners" 2>&1 | quiet
    rm -f "$owners"
    # scripts/lock sets EXTSVC_LOCKING: it only needs uv from here, and pyproject.toml may
    # already ask for what the old lock lacks
    if ! "$VENV/bin/python" -m pip check >&2; then
      [ -n "${EXTSVC_LOCKING:-}" ] || { echo "the installed set is inconsistent: run scripts/lock" >&2; exit 1; }
    fi
  fi
  echo "$want" > "$stamp"
  say "$VENV is ready"
fi
