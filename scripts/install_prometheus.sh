#!/usr/bin/env bash
# Installs Prometheus and promtool (Debian package `prometheus`) if either is missing. Idempotent: with
# both on PATH it does nothing. Needs root (or sudo) and the Debian archive; the monitoring tests and
# `previz up --with-monitoring` call it.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi

as_root=()
if [[ "$(id -u)" != 0 ]]; then
  if ! command -v sudo >/dev/null; then
    echo "install_prometheus.sh: need root or sudo to apt-get install prometheus" >&2
    exit 1
  fi
  as_root=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
# --no-install-recommends: no node exporter etc.; the package's postinst does not start a server
# where systemd is not running (containers, CI), and the tests start their own on loopback.
"${as_root[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus >/dev/null && command -v promtool >/dev/null
