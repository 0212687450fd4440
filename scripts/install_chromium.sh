#!/usr/bin/env bash
# Installs Debian's Chromium for the studio page's browser tests (Playwright drives it; it downloads no
# browser of its own), with a CJK font so the shot fields' Chinese labels render in the screenshots.
# Idempotent: with chromium on PATH it does nothing.
set -euo pipefail
exec bash "$(dirname "$0")/apt_install.sh" chromium chromium fonts-wqy-zenhei
