#!/bin/sh
# Make sure the headless browser of the preview tests (tests/data/test_preview.py) is installed: Debian's chromium at
# /usr/bin/chromium. Called by the Makefile's test target before pytest. Installs it with apt-get when missing
# (as root, or through sudo); exits 1 with a clear message when it cannot.
set -eu
BROWSER=/usr/bin/chromium
if [ -x "$BROWSER" ]; then
    exit 0
fi
echo "tests/browser.sh: $BROWSER is missing; installing Debian's chromium with apt-get" >&2
if [ "$(id -u)" = "0" ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "tests/browser.sh: not root and no sudo: install it yourself: apt-get install -y chromium" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium
if [ ! -x "$BROWSER" ]; then
    echo "tests/browser.sh: apt-get finished but $BROWSER is still missing" >&2
    exit 1
fi
"$BROWSER" --version >&2 || true
