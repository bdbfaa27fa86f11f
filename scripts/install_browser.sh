#!/usr/bin/env bash
# Install a headless Chromium for tests/test_service_browser.py: Debian's `chromium` package (playwright,
# from the test extra, drives it; its own browser download is not used). Skips when one is installed.
set -euo pipefail
for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "found $(command -v "$name")"
        exit 0
    fi
done
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install_browser.sh: need root or sudo to apt-get install chromium" >&2
    exit 1
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
command -v chromium
