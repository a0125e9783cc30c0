#!/bin/sh
# The system packages the test suite needs beyond .venv: Chromium and its WebDriver, from Debian's packages, for
# the labelling page's browser tests (tests/test_label.py drives `instructflow label` through Selenium), and
# PostgreSQL's server, which tests/servers.py starts on loopback under Prefect and MLflow (tests/test_servers.py).
# Idempotent: installs only what is missing, with sudo when not root; says what to do when it cannot.
set -eu

PACKAGES="chromium chromium-driver postgresql"

installed() {  # a Debian package, installed
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

if command -v dpkg-query >/dev/null 2>&1; then
    missing=""
    for package in $PACKAGES; do
        installed "$package" || missing="$missing $package"
    done
elif command -v chromedriver >/dev/null 2>&1 && { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } \
     && command -v initdb >/dev/null 2>&1; then
    missing=""  # not Debian, but a Chromium and its driver and PostgreSQL's server are on PATH already
else
    echo "infra/system-packages.sh: not a Debian-like system (no dpkg): install Chromium and chromedriver" \
         "(the same major version) and PostgreSQL's server (initdb, postgres) yourself and put them on PATH" >&2
    exit 1
fi
if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1; then
    as_root="sudo"
else
    echo "infra/system-packages.sh: missing system packages:$missing; run as root (no sudo here):" \
         "apt-get install -y$missing" >&2
    exit 1
fi
echo "infra/system-packages.sh: installing$missing (apt-get${as_root:+, with sudo})"
export DEBIAN_FRONTEND=noninteractive
if ! { $as_root apt-get update -qq && $as_root apt-get install -y -qq --no-install-recommends $missing; }; then
    echo "infra/system-packages.sh: could not install$missing; install them by hand" \
         "(apt-get install -y$missing) and run make test again" >&2
    exit 1
fi
