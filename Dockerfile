# syntax=docker/dockerfile:1
# Build: docker build -t ghcr.io/ameideio/image-mirror-webhook:0.1.0 .
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > benches/decide.rs && cp benches/decide.rs benches/admission.rs \
 && cargo build --release --locked --bin image-mirror-webhook \
 && rm -rf src benches
COPY src ./src
COPY benches ./benches
# The embedded default table is compiled in from deploy/components/ghcr/config.yaml.
COPY deploy ./deploy
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin image-mirror-webhook

# glibc and CA certificates (registry TLS), nothing else; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="image-mirror-webhook" \
      org.opencontainers.image.description="Kubernetes mutating admission webhook that rewrites Pod images to a mirror" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/ameideio/image-mirror-webhook" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /src/target/release/image-mirror-webhook /image-mirror-webhook
USER 65532:65532
EXPOSE 8443 9090
ENTRYPOINT ["/image-mirror-webhook", "serve"]
