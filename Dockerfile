# syntax=docker/dockerfile:1
# The Whereabouts (Rust) image: the statically linked binary at /whereabouts and its plugin-only
# build at /whereabouts-plugin, nothing else.
#
#   docker build -t ghcr.io/whereabouts-rs/whereabouts:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/whereabouts-rs/whereabouts:0.1.0 --push .
#
# The DaemonSet runs `/whereabouts install`, which copies the plugin into the host's CNI bin
# directory as `whereabouts`: the plugin-only build when the node agent serves the plugin (as the
# manifest and the chart set it up), this same binary when it does not. A static binary (glibc
# linked in with crt-static) runs on any host, whatever its libc. hack/images/build writes the
# same image (one layer, the same entrypoint and command) from the same build command for x86_64
# (the test machines'), as an OCI archive, where there is no Docker engine.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
# protoc for the etcd client's protocol files (the C compiler for the bundled SQLite and ring
# is in the image).
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# .cargo/config.toml holds build settings of the shipped binary (see its comments).
COPY .cargo ./.cargo
# benches/ is listed because Cargo.toml names its bench targets.
COPY benches ./benches
COPY src ./src
# The target directory is a cache mount, so the binary is copied out of it. The target is the
# build stage's own platform (crt-static needs it named, or the build scripts and procedural
# macros would be linked statically too), so `docker buildx build --platform
# linux/amd64,linux/arm64` builds the image for both: the DaemonSet runs on every Linux node.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(rustc -vV | sed -n 's/^host: //p')" \
    && RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --target "$target" \
        --bin whereabouts --bin whereabouts-plugin \
    && cp "target/$target/release/whereabouts" /whereabouts \
    && cp "target/$target/release/whereabouts-plugin" /whereabouts-plugin

FROM scratch
COPY --from=build /whereabouts /whereabouts
COPY --from=build /whereabouts-plugin /whereabouts-plugin
ENTRYPOINT ["/whereabouts"]
CMD ["install"]
