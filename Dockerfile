# syntax=docker/dockerfile:1
# Herald's image. One recipe, two ways to feed it:
#
#   docker build -t ghcr.io/herald-dev/herald:0.1.0 .      (or podman build, buildah bud)
#       compiles the release binary in RUST_IMAGE and puts it in RUNTIME_IMAGE (distroless
#       cc: glibc, libgcc, no shell);
#   hack/build-image.sh
#       builds offline from local parts: a binary built on the host and the shared libraries
#       it links (what `ldd` lists), in an image from scratch
#       (--build-arg BINARY_FROM=prebuilt --build-arg RUNTIME_IMAGE=local-runtime, with a
#       build context holding `herald` and `rootfs/`).
#
# Either way the image holds /herald alone (plus the runtime's libraries), runs as uid 65532
# and carries the OCI labels below. The stages a build does not name are skipped (BuildKit,
# buildah), so a normal build never reads `herald` or `rootfs/` from its context.

ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
# `source`: compile in RUST_IMAGE; `prebuilt`: take `herald` from the build context.
ARG BINARY_FROM=source

FROM ${RUST_IMAGE} AS source
WORKDIR /src
# Only what the release binary is built from (see .dockerignore): a change in tests/, deploy/
# or charts/ does not invalidate the build. The workspace manifest names bench/ and benches/,
# so cargo needs them present even though the image builds only `herald`.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY bench ./bench
COPY benches ./benches
# The cache mounts keep the registry and target/ between builds (BuildKit); the binary is
# copied out of the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin herald \
    && install -D -m 0755 target/release/herald /out/herald

FROM scratch AS prebuilt
COPY --chmod=0755 herald /out/herald

# The offline runtime: the shared libraries the binary links, at the paths it expects.
FROM scratch AS local-runtime
COPY rootfs/ /

FROM ${BINARY_FROM} AS binary

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="herald" \
      org.opencontainers.image.description="A Kubernetes operator that turns Alertmanager alerts and cluster events into webhook notifications" \
      org.opencontainers.image.source="https://github.com/herald-dev/herald" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=binary /out/herald /herald
# The receiver (alerts, /healthz, /readyz, /metrics).
EXPOSE 8080
USER 65532:65532
ENTRYPOINT ["/herald"]
CMD ["controller"]
