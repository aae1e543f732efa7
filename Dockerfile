# syntax=docker/dockerfile:1
# One small image with both services and the `omnibus` tool; Compose and Kubernetes pick the
# binary with `command:`.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# librdkafka is built from source by the rdkafka crate (its bundled build needs make and a C++ compiler).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential python3 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/consumer-svc target/release/db-svc target/release/omnibus /out/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home omnibus
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
# gRPC (consumer-svc, db-svc) and their metrics/probe endpoints (with METRICS_LISTEN set).
EXPOSE 50051 50052 9464 9465
ENTRYPOINT []
CMD ["consumer-svc", "--help"]
