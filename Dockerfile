# syntax=docker/dockerfile:1
#
# One image holding both binaries, /usr/local/bin/vpn-seed-server and
# /usr/local/bin/vpn-shoot-client; the Kubernetes manifests in deploy/ pick one with `command:`.
#
#   docker build -t reversed-vpn:0.1.0 .
#   docker run --rm reversed-vpn:0.1.0 vpn-shoot-client keygen
#
# Privileges. Both binaries create a TUN device, change addresses, routes and policy rules over
# netlink and (shoot client) load nftables rules: they need CAP_NET_ADMIN and /dev/net/tun
# (a hostPath CharDevice volume in Kubernetes; container runtimes allow the tun device 10:200
# but do not create the node). The image runs as the unprivileged user 65532 and gets
# CAP_NET_ADMIN from *file capabilities* (setcap cap_net_admin+ep below):
#   - Kubernetes grants no ambient capabilities, and `capabilities.add` alone does not reach the
#     effective set of a non-root process; a file capability does, at exec, as long as the
#     capability is in the bounding set. So the pod must add NET_ADMIN (`drop: [ALL]`,
#     `add: [NET_ADMIN]`) and must not set `allowPrivilegeEscalation: false` (no_new_privs
#     would ignore file capabilities).
#   - Without NET_ADMIN in the bounding set the kernel refuses to exec these binaries at all
#     (EPERM), rather than starting them half-privileged.
#   - The shoot client runs `nft -j -f -`; a child process does not inherit the capability, so
#     /usr/sbin/nft carries the same file capability.
#   - The user opens the node's /dev/net/tun, which must then be mode 0666 (udev's default).
#     Run as root (runAsUser: 0) instead and the file capabilities are irrelevant: the pod's
#     `capabilities.add: [NET_ADMIN]` then suffices.
# Kernel settings (ip_forward, rp_filter, ...) live under /proc/sys, which Kubernetes mounts
# read-only in unprivileged containers; the manifests set them from a short privileged init
# container (see deploy/README.md).

# ---- build ------------------------------------------------------------------------------
FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
# .dockerignore admits only the workspace manifests and crate sources.
COPY . .
# Without debug info the binaries shrink from ~50 MB to ~9 MB each; symbols stay.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p vpn-seed-server -p vpn-shoot-client \
 && install -D -m 0755 -t /out target/release/vpn-seed-server target/release/vpn-shoot-client

# ---- runtime ----------------------------------------------------------------------------
# Same Debian release as the builder, so the binaries' glibc matches.
FROM debian:12.11-slim
# nftables: the shoot client's NAT and forwarding rules go through `nft -j`.
# ca-certificates: the shoot client's optional TLS to the ingress (--endpoint-tls).
# libcap2-bin: setcap below (and getcap to inspect the image).
# Package versions follow the pinned Debian point release and its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables ca-certificates libcap2-bin \
 && rm -rf /var/lib/apt/lists/*
# Copy and setcap in one step: a setcap in a later layer would store every binary twice.
RUN --mount=type=bind,from=build,source=/out,target=/out \
    install -m 0755 /out/vpn-seed-server /out/vpn-shoot-client /usr/local/bin/ \
 && setcap cap_net_admin+ep /usr/local/bin/vpn-seed-server \
 && setcap cap_net_admin+ep /usr/local/bin/vpn-shoot-client \
 && setcap cap_net_admin+ep /usr/sbin/nft
USER 65532:65532
# Seed server: tunnel, egress proxy, health/metrics. Shoot client: health/metrics (15001).
EXPOSE 1194/tcp 9443/tcp 15000/tcp 15001/tcp
CMD ["vpn-shoot-client", "--help"]
