#!/usr/bin/env bash
# Installs Prometheus and promtool (Debian package `prometheus`) if either is missing. Idempotent: with
# both on PATH it does nothing. The monitoring tests and `previz up --with-monitoring` call it.
# --no-install-recommends (in apt_install.sh): no node exporter etc.; the package's postinst does not
# start a server where systemd is not running (containers, CI), and the tests start their own on loopback.
set -euo pipefail
exec bash "$(dirname "$0")/apt_install.sh" "prometheus promtool" prometheus
