#!/usr/bin/env bash
# System services the tests run for real: Prometheus and its Pushgateway (Debian's packages).
# Installs only what is missing; needs root (or sudo).
set -euo pipefail
packages=()
command -v prometheus >/dev/null || packages+=(prometheus)
command -v prometheus-pushgateway >/dev/null || packages+=(prometheus-pushgateway)
if [ ${#packages[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi
