#!/usr/bin/env bash
# Headless Chromium for tests/test_report.py, which opens the HTML report as a user would (a screenshot and
# the rendered DOM): Debian's `chromium` package, installed system-wide with apt-get. Unlike the backends
# (fetch_backends.sh), it is not unpacked into .cache: it needs a hundred shared libraries, which only a real
# install brings. Fonts come with it so that the screenshot has text; no recommends (udev, printing, a
# notification daemon: nothing a headless browser uses).
# Needs root, or sudo, the first time; idempotent: exits at once when `chromium` is on the PATH.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  echo "chromium already present: $(command -v chromium)"
  exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "error: installing chromium needs root: run as root, or install sudo, or apt-get install chromium" >&2
  exit 1
fi

"${as_root[@]}" apt-get update -q
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core fonts-liberation
chromium --version
