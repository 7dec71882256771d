#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager (only its garbage collector is started, so
# owner references are honoured as in a real cluster) and kubectl from their Go modules (versions pinned in
# go.mod/go.sum) into a cache directory outside the clone, keyed by the pinned
# inputs, so a warm machine skips the build. Prints the bin directory.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${RLHF_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-operator}"
key="$(cat "$here/go.mod" "$here/go.sum" "$here/etcd/main.go" "$here/build.sh" | sha256sum | cut -c1-16)"
bin="$cache_root/controlplane-$key/bin"
if [[ -x "$bin/kube-apiserver" && -x "$bin/kube-controller-manager" && -x "$bin/etcd" && -x "$bin/kubectl" ]]; then
  echo "$bin"; exit 0
fi
command -v go >/dev/null || { echo "build.sh: the Go toolchain is needed to build the test control plane" >&2; exit 1; }
echo "building the control plane into $bin (first run only; ~10-20 min on 2 cores)" >&2
tmp="$bin.partial.$$"
mkdir -p "$tmp"
cd "$here"
export GOFLAGS=-mod=mod CGO_ENABLED=0
go build -trimpath -ldflags='-s -w' -o "$tmp/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl \
  k8s.io/kubernetes/cmd/kube-controller-manager >&2
go build -trimpath -ldflags='-s -w' -o "$tmp/etcd" ./etcd >&2
rm -rf "$bin"; mv "$tmp" "$bin"
echo "$bin"
