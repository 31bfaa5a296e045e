# petrel-operator, petrel-relay and the kubectl plugin kubectl-petrel in one
# small non-root image.
#   docker build -t REGISTRY/petrel:0.1.0 .
# Without a Docker engine, .ci/build-image.sh writes the same image (same
# binaries, glibc of Debian 12, uid 65532, entrypoint and ports) as an OCI
# layout and checks that it runs.
# The chart runs /usr/local/bin/petrel-operator; the operator runs relay pods
# from the same image with /usr/local/bin/petrel-relay.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p petrel-relay -p petrel-operator \
 && install -D -m 0755 target/release/petrel-relay /out/petrel-relay \
 && install -D -m 0755 target/release/petrel-operator /out/petrel-operator \
 && install -D -m 0755 target/release/kubectl-petrel /out/kubectl-petrel

# Distroless: glibc and CA certificates, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/petrel-relay /out/petrel-operator /out/kubectl-petrel /usr/local/bin/
USER 65532:65532
# SMTP listeners bind unprivileged ports (25 -> 10025 inside the pod); 9090 is
# the relay's HTTP (metrics, health, send API), 8080 the operator's.
EXPOSE 10025 10587 9090 8080
ENTRYPOINT ["/usr/local/bin/petrel-relay"]
