# syntax=docker/dockerfile:1
# The Whereabouts (Rust) image: one statically linked binary at /whereabouts, nothing else.
#
#   docker build -t ghcr.io/whereabouts-rs/whereabouts:0.1.0 .
#
# The DaemonSet runs `/whereabouts install`, which copies this same binary into the host's CNI
# bin directory; a static (musl) binary runs on any host, whatever its libc.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-alpine AS build
# A C compiler for the bundled SQLite and ring, protoc for the etcd client's protocol files.
RUN apk add --no-cache musl-dev gcc protoc protobuf-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# benches/ is listed because Cargo.toml names its bench targets.
COPY benches ./benches
COPY src ./src
# On Alpine the host target is *-linux-musl, which links statically by default.
# The target directory is a cache mount, so the binary is copied out of it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked --bin whereabouts \
    && cp target/release/whereabouts /whereabouts

FROM scratch
COPY --from=build /whereabouts /whereabouts
ENTRYPOINT ["/whereabouts"]
CMD ["install"]
