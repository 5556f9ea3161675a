#!/usr/bin/env bash
# Test set-up only (scripts/test.sh): the dashboard's browser tests drive Debian's chromium
# through chromedriver (Selenium is pinned in the dev extra; no browser is downloaded).
# Installs them with apt when this runs as root on Debian/Ubuntu; otherwise says what is
# missing and the browser tests are skipped with that reason. Never needed to use tuneforge.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium + chromium-driver for the dashboard's browser tests (apt-get)"
  # -qq and no recommends: the browser and its driver only (about 100 MB)
  if apt-get update -qq >/dev/null && \
     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; then
    exit 0
  fi
  echo "note: apt-get could not install chromium chromium-driver; the browser tests will be skipped"
else
  echo "note: no chromium/chromedriver (Debian/Ubuntu: apt-get install chromium chromium-driver); the dashboard's browser tests will be skipped"
fi
exit 0
