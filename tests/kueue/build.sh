#!/usr/bin/env bash
# Builds the Kueue manager the node tier's Kueue tests run (tests/node/test_kueue.py), from its Go module
# (sigs.k8s.io/kueue, the version below), and keeps its CRDs beside it (config/components/crd of the same
# module). `go install module@version` refuses a module whose go.mod has replace directives, as Kueue's
# does, so the build runs inside a copy of the downloaded module source, where they apply.
# Also builds versionproxy (see its main.go: the test control plane reports a version Kueue cannot parse).
# Output goes to a cache directory outside the clone, keyed by this script (which pins the version), the
# proxy's source and the Go toolchain, so a warm machine skips the build. Prints the directory
# (bin/kueue, bin/versionproxy, crd/).
set -euo pipefail
version="v0.17.0"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${RLHF_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-operator}"
command -v go >/dev/null || { echo "kueue/build.sh: the Go toolchain is needed to build Kueue" >&2; exit 1; }
key="$( (cat "$here/build.sh" "$here/versionproxy/go.mod" "$here/versionproxy/main.go"; go version) | sha256sum | cut -c1-16)"
out="$cache_root/kueue-$key"
if [[ -x "$out/bin/kueue" ]]; then  # moved into place last: the directory is complete
  echo "$out"; exit 0
fi
# One build at a time: a second caller waits, then finds it done.
mkdir -p "$cache_root"
exec 9>"$cache_root/.kueue-build.lock"
flock 9
if [[ -x "$out/bin/kueue" ]]; then echo "$out"; exit 0; fi
echo "building Kueue $version into $out (first run only; ~10 min on 2 cores)" >&2
tmp="$out.partial.$$"
rm -rf "$tmp"; mkdir -p "$tmp/bin" "$tmp/src"
trap 'rm -rf "$tmp"' EXIT
src="$(cd "$tmp" && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kueue@$version" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
[[ -d "$src" ]] || { echo "kueue/build.sh: could not download sigs.k8s.io/kueue@$version" >&2; exit 1; }
cp -r "$src/." "$tmp/src/"
chmod -R u+w "$tmp/src"
cp -r "$tmp/src/config/components/crd/bases" "$tmp/crd"
(cd "$tmp/src" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$tmp/bin/kueue" ./cmd/kueue >&2)
(cd "$here/versionproxy" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$tmp/bin/versionproxy" . >&2)
rm -rf "$tmp/src"
trap - EXIT
rm -rf "$out"; mv "$tmp" "$out"
echo "$out"
