#!/usr/bin/env bash
# The project's test command (CI runs it as root): unit, property, in-process and netns
# end-to-end tests, then the deterministic simulation. VPN_E2E=skip skips the netns tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --workspace --bins
cargo test --workspace
cargo test -p common --features sim --test sim
