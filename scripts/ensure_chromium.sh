#!/usr/bin/env bash
# Make sure Debian's headless-capable Chromium and its WebDriver are installed (the playground's browser test).
set -euo pipefail
CHROMIUM=${UNIGUARD_CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${UNIGUARD_CHROMEDRIVER:-/usr/bin/chromedriver}
if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then exit 0; fi
echo "chromium / chromedriver missing: installing the Debian packages chromium and chromium-driver with apt-get" >&2
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
if [ ! -x "$CHROMIUM" ] || [ ! -x "$CHROMEDRIVER" ]; then
  echo "chromium or chromedriver still missing after apt-get ($CHROMIUM, $CHROMEDRIVER)" >&2
  exit 1
fi
