#!/usr/bin/env bash
# Builds helm and kubeconform from their Go modules (versions pinned in go.mod/go.sum) into a cache
# directory outside the clone, keyed by the pinned inputs, so a warm machine skips the build.
# Prints the bin directory. No download script, no release tarball: `go build` from the module proxy.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${RLHF_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-operator}"
key="$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)"
bin="$cache_root/charttools-$key/bin"
if [[ -x "$bin/helm" && -x "$bin/kubeconform" ]]; then
  echo "$bin"; exit 0
fi
command -v go >/dev/null || { echo "build.sh: the Go toolchain is needed to build helm and kubeconform" >&2; exit 1; }
echo "building helm and kubeconform into $bin (first run only; ~5-10 min on 2 cores)" >&2
tmp="$bin.partial.$$"
mkdir -p "$tmp"
cd "$here"
export GOFLAGS=-mod=mod CGO_ENABLED=0
# Stamp the versions pinned in go.mod into `helm version` / `kubeconform -v`.
helm_v="$(go list -m -f '{{.Version}}' helm.sh/helm/v4)"
kc_v="$(go list -m -f '{{.Version}}' github.com/yannh/kubeconform)"
go build -trimpath -ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$helm_v" -o "$tmp/" helm.sh/helm/v4/cmd/helm >&2
go build -trimpath -ldflags="-s -w -X main.version=$kc_v" -o "$tmp/" github.com/yannh/kubeconform/cmd/kubeconform >&2
rm -rf "$bin"; mv "$tmp" "$bin"
echo "$bin"
