#!/usr/bin/env bash
# System services the tests run for real (Debian's packages): Prometheus and its Pushgateway,
# Slurm with munge for a single-node cluster on localhost, and Chromium, which Playwright drives
# to open the run report (Playwright's own browser downloads are not used), and podman with
# mmdebstrap and runc, which build and run the project's image from a base of Debian's packages.
# Installs only what is missing; needs root (or sudo).
set -euo pipefail
packages=()
command -v prometheus >/dev/null || packages+=(prometheus)
command -v prometheus-pushgateway >/dev/null || packages+=(prometheus-pushgateway)
command -v slurmctld >/dev/null || packages+=(slurm-wlm)
command -v munged >/dev/null || packages+=(munge)
command -v chromium >/dev/null || packages+=(chromium)
command -v podman >/dev/null || packages+=(podman)
command -v mmdebstrap >/dev/null || packages+=(mmdebstrap)
command -v runc >/dev/null || packages+=(runc)
if [ ${#packages[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi
