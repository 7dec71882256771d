#!/usr/bin/env bash
# Builds SeaweedFS's `weed` binary, the S3-compatible server the publish stage's tests upload to
# (tests/stages/test_publish.py), from its Go module (github.com/seaweedfs/seaweedfs, the version below).
# Like tests/kueue/build.sh, it builds inside a copy of the downloaded module source (its go.mod has
# replace directives, which `go install module@version` refuses).
# Output goes to a cache directory outside the clone, keyed by this script (which pins the version) and the
# Go toolchain, so a warm machine skips the build. Prints the directory (bin/weed).
set -euo pipefail
version="v0.0.0-20261109003541-7506e5f91cd6"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${RLHF_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-operator}"
command -v go >/dev/null || { echo "s3/build.sh: the Go toolchain is needed to build SeaweedFS" >&2; exit 1; }
key="$( (cat "$here/build.sh"; go version) | sha256sum | cut -c1-16)"
out="$cache_root/seaweedfs-$key"
if [[ -x "$out/bin/weed" ]]; then  # moved into place last: the directory is complete
  echo "$out"; exit 0
fi
# One build at a time: a second caller waits, then finds it done.
mkdir -p "$cache_root"
exec 9>"$cache_root/.seaweedfs-build.lock"
flock 9
if [[ -x "$out/bin/weed" ]]; then echo "$out"; exit 0; fi
echo "building SeaweedFS $version into $out (first run only; ~15 min on 2 cores)" >&2
tmp="$out.partial.$$"
rm -rf "$tmp"; mkdir -p "$tmp/bin" "$tmp/src"
trap 'rm -rf "$tmp"' EXIT
src="$(cd "$tmp" && GOFLAGS=-mod=mod go mod download -json "github.com/seaweedfs/seaweedfs@$version" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
[[ -d "$src" ]] || { echo "s3/build.sh: could not download github.com/seaweedfs/seaweedfs@$version" >&2; exit 1; }
cp -r "$src/." "$tmp/src/"
chmod -R u+w "$tmp/src"
(cd "$tmp/src" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$tmp/bin/weed" ./weed >&2)
rm -rf "$tmp/src"
trap - EXIT
rm -rf "$out"; mv "$tmp" "$out"
echo "$out"
