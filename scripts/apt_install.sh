#!/usr/bin/env bash
# apt-get installs Debian packages unless every named command is already on PATH. Used by the install_*
# scripts: `apt_install.sh "CMD..." PKG...`. Needs root (or sudo) and the Debian archive.
set -euo pipefail

commands=$1
shift
missing=0
for command in $commands; do
  command -v "$command" >/dev/null || missing=1
done
if [[ $missing == 0 ]]; then
  exit 0
fi

as_root=()
if [[ "$(id -u)" != 0 ]]; then
  if ! command -v sudo >/dev/null; then
    echo "apt_install.sh: need root or sudo to apt-get install $*" >&2
    exit 1
  fi
  as_root=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
for command in $commands; do
  command -v "$command" >/dev/null
done
