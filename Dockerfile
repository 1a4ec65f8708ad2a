# paystream's container image: `paystream run` by default, `paystream updater` with that command.
#
# Build stage: the same cargo command CI runs (scripts/check-dockerfile extracts the RUN line
# below and runs it verbatim), with --locked so the image holds exactly the tested dependencies.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --locked --release --bin paystream

# Run stage: slim Debian with only what the binary needs at run time (librdkafka and TLS are
# linked in; curl serves the HEALTHCHECK; ca-certificates for any TLS a librdkafka option asks).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/paystream paystream \
 && mkdir -p /var/lib/paystream \
 && chown paystream:paystream /var/lib/paystream
COPY --from=build /src/target/release/paystream /usr/local/bin/paystream
USER paystream
WORKDIR /var/lib/paystream
# The state store. One data dir per instance: sled allows one process to open it.
VOLUME ["/var/lib/paystream"]
ENV PAYSTREAM_DATA_DIR=/var/lib/paystream \
    PAYSTREAM_METRICS_ADDR=0.0.0.0:9898 \
    PAYSTREAM_LOG_FORMAT=json
EXPOSE 9898
# Liveness on /healthz at whatever port PAYSTREAM_METRICS_ADDR names (the updater's too).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${PAYSTREAM_METRICS_ADDR##*:}/healthz" >/dev/null || exit 1
ENTRYPOINT ["paystream"]
CMD ["run"]
