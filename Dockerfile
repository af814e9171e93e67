# Multi-stage build of the bos binary.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY src src
COPY migrations migrations
COPY config config
RUN cargo build --release --locked --bin bos

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/bos /usr/local/bin/bos
ENV BOS_HTTP_ADDR=0.0.0.0:5000
EXPOSE 5000
HEALTHCHECK --interval=5s --timeout=5s --retries=12 CMD curl -fsS http://localhost:5000/readyz > /dev/null || exit 1
ENTRYPOINT ["bos"]
CMD ["run"]
