# syntax=docker/dockerfile:1
# Build: docker build -t ghcr.io/ameideio/image-mirror-webhook:0.1.0 .
# Base images are pinned by digest (the tag says which version it was): a rebuild gets the
# bytes that were reviewed. To move to a newer build of a tag:
#   skopeo inspect --format '{{.Digest}}' docker://docker.io/library/rust:1.95-bookworm
FROM docker.io/library/rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them. Every target the manifest names
# must exist, so each bench gets an empty stand-in.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && for b in $(awk '/^\[\[bench\]\]/ {b = 1; next} b && /^name = / {gsub(/"/, "", $3); print $3; b = 0}' Cargo.toml); do \
      echo 'fn main() {}' > "benches/$b.rs"; done \
 && cargo build --release --locked --bin image-mirror-webhook \
 && rm -rf src benches
COPY src ./src
COPY benches ./benches
# The embedded default table is compiled in from deploy/components/ghcr/config.yaml.
COPY deploy ./deploy
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin image-mirror-webhook

# glibc and CA certificates (registry TLS), nothing else; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
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
