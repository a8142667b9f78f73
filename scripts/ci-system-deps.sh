#!/bin/sh
# System packages the test suite needs beyond the Python virtual environment.
#
# Idempotent: installs nothing when the tools are already on PATH. Meant for
# Debian/Ubuntu (apt) and run as root (CI containers); elsewhere it says what
# is missing and fails, so `make test` never silently skips a check.
#
#   docker-compose  Debian's Compose v1 (1.29), used offline by tests/test_compose.py
#                   (`docker-compose config -q`) to validate compose/docker-compose.yml.
#                   No Docker engine is needed for `config`.
#   stunnel4        TLS terminator in front of the embedded broker (tansu 0.6.0 cannot
#                   serve TLS), used by tests/test_rel_security.py.
#   nodejs, npm     Node.js 18+ (Debian 12's) and npm: `make test` installs the official
#                   AsyncAPI parser into tests/asyncapi (`npm ci`) for tests/test_asyncapi.py.
#   chromium        Debian's headless browser, driven by Playwright in tests/test_gallery.py
#                   (Playwright's own browser download is not used).
set -eu

missing=""
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 || missing="$missing stunnel4"
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"

if [ -z "$missing" ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-system-deps: missing:$missing (no apt-get here; install them by hand)" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "ci-system-deps: missing:$missing; run this script as root" >&2
        exit 1
    fi
fi

$SUDO apt-get update
# shellcheck disable=SC2086  # $missing is a list of package names
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $missing
