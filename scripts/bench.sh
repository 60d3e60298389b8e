#!/usr/bin/env bash
# Benchmark: builds the release binaries, then runs target/release/bench as root. It builds
# the seed | gw | shoot | pod topology in network namespaces (unique names, removed at the
# end, also on Ctrl-C), measures the direct veth, the product and - when `openvpn` is
# installed - OpenVPN 2.6 over TCP through the same CONNECT ingress, and prints one table.
#   scripts/bench.sh                          3 interleaved rounds, all rows (~15 min)
#   scripts/bench.sh --quick --rounds 1       a quick look (~3 min)
#   scripts/bench.sh --planes direct,product --rows throughput,latency --out /tmp/b
#   scripts/bench.sh --help                   every flag
# Needs root; installs what is missing (iproute2, nftables, curl, iperf3, openvpn).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "bench.sh: needs root (network namespaces); run it as root" >&2
  exit 1
fi
scripts/deps.sh --bench
cargo build --release --workspace --bins
VPN_BIN_DIR="$PWD/target/release" exec target/release/bench "$@"
