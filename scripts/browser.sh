#!/usr/bin/env bash
# A Chromium for tests/test_browser.py (Playwright drives it; it downloads no browser of its own).
# Installs Debian's `chromium` when none is found and this runs as root with apt-get; otherwise says
# why not and leaves it: the browser tests then skip, naming what is missing. Idempotent.
set -uo pipefail
if [ -n "${PLATEMASK_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "browser: no Chromium, and not root with apt-get to install it: the browser tests will skip" \
       "(install Debian's chromium, or set PLATEMASK_CHROMIUM to a Chromium binary)" >&2
  exit 0
fi
echo "browser: installing Debian's chromium for the browser tests ..."
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get install -y -q --no-install-recommends chromium fonts-liberation >/dev/null \
       || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium fonts-liberation >/dev/null; }; }; then
  echo "browser: apt-get could not install chromium: the browser tests will skip" >&2
fi
exit 0
