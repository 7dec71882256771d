#!/usr/bin/env bash
# Builds KWOK (sigs.k8s.io/kwok, the version below) from its Go module for the operator load benchmark
# (benchmarks/operator_load.py): it plays the kubelet of simulated GPU nodes, so stage Pods run and complete
# without containers. `go install module@version` builds it as released (its go.mod has no replace
# directives); the module proxy and the checksum database pin the source. Output goes to a cache directory
# outside the clone, keyed by this script (which pins the version) and the Go toolchain, so a warm machine
# skips the build. Prints the directory: bin/kwok, and crd/stages.yaml (KWOK's Stage CRD from the same module:
# the benchmark creates Stages while it runs, to release a wave of Pods at one moment).
set -euo pipefail
version="v0.8.0"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${RLHF_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-operator}"
command -v go >/dev/null || { echo "kwok/build.sh: the Go toolchain is needed to build KWOK" >&2; exit 1; }
key="$( (cat "$here/build.sh"; go version) | sha256sum | cut -c1-16)"
out="$cache_root/kwok-$key"
if [[ -x "$out/bin/kwok" ]]; then  # moved into place last: the directory is complete
  echo "$out"; exit 0
fi
# One build at a time: a second caller waits, then finds it done.
mkdir -p "$cache_root"
exec 9>"$cache_root/.kwok-build.lock"
flock 9
if [[ -x "$out/bin/kwok" ]]; then echo "$out"; exit 0; fi
echo "building KWOK $version into $out (first run only; ~5 min on 2 cores)" >&2
tmp="$out.partial.$$"
rm -rf "$tmp"; mkdir -p "$tmp/bin" "$tmp/crd"
trap 'rm -rf "$tmp"' EXIT
# Run outside any module (the clone has none at its root) so only KWOK's own go.mod decides the versions.
src="$(cd "$tmp" && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kwok@$version" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
[[ -d "$src" ]] || { echo "kwok/build.sh: could not download sigs.k8s.io/kwok@$version" >&2; exit 1; }
cp "$src/kustomize/crd/bases/kwok.x-k8s.io_stages.yaml" "$tmp/crd/stages.yaml"
(cd "$tmp" && GOBIN="$tmp/bin" GOFLAGS=-mod=mod CGO_ENABLED=0 go install -trimpath -ldflags='-s -w' \
  "sigs.k8s.io/kwok/cmd/kwok@$version" >&2)
trap - EXIT
rm -rf "$out"; mv "$tmp" "$out"
echo "$out"
