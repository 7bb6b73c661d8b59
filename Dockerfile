# syntax=docker/dockerfile:1
# Herald's image: `docker build -t ghcr.io/herald-dev/herald:0.1.0 .`
# The binary is the whole image: distroless cc (glibc, libgcc, CA certificates), no shell.

FROM rust:1-bookworm AS builder
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

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="herald" \
      org.opencontainers.image.description="A Kubernetes operator that turns Alertmanager alerts and cluster events into webhook notifications" \
      org.opencontainers.image.source="https://github.com/herald-dev/herald" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/herald /herald
# The receiver (alerts, /healthz, /readyz, /metrics).
EXPOSE 8080
USER 65532:65532
ENTRYPOINT ["/herald"]
CMD ["controller"]
