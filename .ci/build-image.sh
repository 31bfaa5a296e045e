#!/usr/bin/env bash
# Builds the Petrel OCI image (petrel-relay, petrel-operator, kubectl-petrel)
# without a container engine, then runs the binaries from the unpacked image as
# uid 65532 on a read-only root, and fails when they do not run.
#
#   .ci/build-image.sh [--release|--debug] [--out DIR] [--tag TAG]
#
# The image is written as an OCI image layout (DIR, default
# target-dir/image/oci) by hand: one gzip layer tarball, a config, a manifest
# and an index, each named by its sha256 digest. No daemon, no base image to
# pull, no network: the root filesystem is the binaries plus exactly the shared
# libraries `ldd` says they load, taken from this Debian machine (the same
# glibc as distroless/cc-debian12, which the Dockerfile uses), the CA bundle,
# and /etc/passwd and /etc/group with the nonroot user 65532. The layer is
# reproducible: sorted names, fixed mtime, numeric root ownership, `gzip -n`.
#
# Checks: `skopeo inspect` reads the layout (when skopeo is installed),
# `umoci unpack` (when installed; else tar) extracts it verifying every digest,
# then `petrel-relay --version` and `petrel-operator --version` run from the
# unpacked root, bind-mounted read-only in a private mount namespace, through
# `chroot --userspec=65532:65532`. Needs root (mount namespace, chroot).
#
# Push:  skopeo copy oci:DIR:TAG docker://REGISTRY/petrel:TAG
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
tag=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --release) profile=release ;;
    --debug) profile=debug ;;
    --tag) tag="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "build-image: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
tag="${tag:-$version}"
target_dir="${CARGO_TARGET_DIR:-target}"
out="${out:-$target_dir/image/oci}"
work="$target_dir/image/work"
bins=(petrel-relay petrel-operator)
# The kubectl plugin ships in the image too, when the workspace has it.
if grep -q '^name = "kubectl-petrel"' operator/Cargo.toml; then bins+=(kubectl-petrel); fi
# Reproducible timestamps: the last commit's time, like SOURCE_DATE_EPOCH elsewhere.
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
start=$(date +%s)

cargo_flags=(--locked -p petrel-relay -p petrel-operator)
for b in "${bins[@]}"; do cargo_flags+=(--bin "$b"); done
[ "$profile" = release ] && cargo_flags+=(--release)
cargo build "${cargo_flags[@]}"
bindir="$target_dir/$profile"
echo "build-image: binaries built after $(( $(date +%s) - start ))s"

rm -rf "$work" "$out"
root="$work/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot"
for b in "${bins[@]}"; do install -m 0755 "$bindir/$b" "$root/usr/local/bin/$b"; done

# Exactly the shared libraries the binaries load (and the dynamic loader),
# at the paths the loader looks them up at.
libs=$(for b in "${bins[@]}"; do ldd "$bindir/$b"; done \
  | awk '/=> \// { print $3 } /^\s*\/[^ ]+ \(/ { print $1 }' | sort -u)
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# Debian keeps the loader at /lib64 as a symlink into /lib/x86_64-linux-gnu;
# the copy above resolved it into a file, which works the same.

cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat > "$root/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
chmod 1777 "$root/tmp"
chmod 0755 "$root/home/nonroot"

# The layer: one tarball, reproducible; everything owned by root but the
# nonroot home directory.
chown -R 0:0 "$root"
chown 65532:65532 "$root/home/nonroot"
layer_tar="$work/layer.tar"
(cd "$root" && find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z \
  | tar --null --no-recursion -T - -cf - --numeric-owner --format=posix \
      --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
      --mtime="@$epoch") > "$layer_tar"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
mkdir -p "$out/blobs/sha256"
diff_id=$(sha "$layer_tar")
gzip -n -6 -c "$layer_tar" > "$work/layer.tar.gz"
layer_digest=$(sha "$work/layer.tar.gz")
layer_size=$(size "$work/layer.tar.gz")
mv "$work/layer.tar.gz" "$out/blobs/sha256/$layer_digest"

created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# Same runtime settings as the Dockerfile's final stage.
jq -cn --arg created "$created" --arg diff "sha256:$diff_id" --arg version "$version" \
  --arg revision "$revision" '{
  created: $created, architecture: "amd64", os: "linux",
  config: {
    User: "65532:65532",
    Entrypoint: ["/usr/local/bin/petrel-relay"],
    Env: ["PATH=/usr/local/bin:/usr/bin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
    WorkingDir: "/home/nonroot",
    ExposedPorts: {"10025/tcp": {}, "10587/tcp": {}, "9090/tcp": {}, "8080/tcp": {}},
    Labels: {
      "org.opencontainers.image.title": "petrel",
      "org.opencontainers.image.version": $version,
      "org.opencontainers.image.revision": $revision,
      "org.opencontainers.image.source": "https://github.com/petrel-dev/petrel"
    }
  },
  rootfs: {type: "layers", diff_ids: [$diff]},
  history: [{created: $created, created_by: ".ci/build-image.sh"}]
}' > "$work/config.json"
config_digest=$(sha "$work/config.json")
config_size=$(size "$work/config.json")
mv "$work/config.json" "$out/blobs/sha256/$config_digest"

jq -cn --arg cd "sha256:$config_digest" --argjson cs "$config_size" \
  --arg ld "sha256:$layer_digest" --argjson ls "$layer_size" '{
  schemaVersion: 2,
  mediaType: "application/vnd.oci.image.manifest.v1+json",
  config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs},
  layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $ld, size: $ls}]
}' > "$work/manifest.json"
manifest_digest=$(sha "$work/manifest.json")
manifest_size=$(size "$work/manifest.json")
mv "$work/manifest.json" "$out/blobs/sha256/$manifest_digest"

jq -n --arg md "sha256:$manifest_digest" --argjson ms "$manifest_size" --arg tag "$tag" '{
  schemaVersion: 2,
  mediaType: "application/vnd.oci.image.index.v1+json",
  manifests: [{
    mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $md, size: $ms,
    platform: {architecture: "amd64", os: "linux"},
    annotations: {"org.opencontainers.image.ref.name": $tag}
  }]
}' > "$out/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$out/oci-layout"
echo "build-image: oci:$out:$tag manifest sha256:$manifest_digest layer $(( layer_size / 1024 / 1024 ))MiB after $(( $(date +%s) - start ))s"

# --- Check the image as an image, not as the directory it was made from.
if command -v skopeo >/dev/null; then
  skopeo inspect "oci:$out:$tag" | jq -e --arg d "sha256:$layer_digest" '.Layers == [$d]' >/dev/null \
    || { echo "build-image: skopeo does not read the layout" >&2; exit 1; }
fi
bundle="$work/bundle"
if command -v umoci >/dev/null; then
  # umoci verifies every blob's digest and size as it unpacks.
  umoci unpack --image "$out:$tag" "$bundle" >/dev/null
  unpacked="$bundle/rootfs"
else
  mkdir -p "$bundle/rootfs"
  echo "$layer_digest  $out/blobs/sha256/$layer_digest" | sha256sum -c --quiet
  tar -xzf "$out/blobs/sha256/$layer_digest" -C "$bundle/rootfs"
  unpacked="$bundle/rootfs"
fi

# Run each binary as 65532 from the unpacked root, mounted read-only in a
# private mount namespace (nothing leaks onto the host's mount table).
for b in petrel-relay petrel-operator; do
  got=$(unshare --mount --propagation private sh -c '
    set -e
    mount --bind "$1" "$1"
    mount -o remount,bind,ro "$1"
    exec chroot --userspec=65532:65532 "$1" "/usr/local/bin/$2" --version
  ' sh "$unpacked" "$b") || { echo "build-image: $b --version failed in the image" >&2; exit 1; }
  case "$got" in
    "$b $version"*) echo "build-image: ok: $got (uid 65532, read-only root)" ;;
    *) echo "build-image: $b --version printed '$got', expected '$b $version'" >&2; exit 1 ;;
  esac
done
echo "build-image: done after $(( $(date +%s) - start ))s"
