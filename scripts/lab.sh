#!/usr/bin/env bash
# Build the binaries and run the lab: the seed | gw | shoot | pod topology in network
# namespaces with every component, and kube-apiserver's CONNECT through the tunnel.
#   scripts/lab.sh            run, report, tear down
#   scripts/lab.sh --keep     leave it running (prints how to enter and how to tear down)
#   scripts/lab.sh --teardown vlab
# Needs root (network namespaces); installs iproute2, nftables, curl when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "lab.sh: needs root (network namespaces); run it as root" >&2
  exit 1
fi
if [[ ${1:-} != --teardown ]]; then
  ./scripts/deps.sh --lab
fi
cargo build --release --workspace --bins
exec target/release/lab "$@"
