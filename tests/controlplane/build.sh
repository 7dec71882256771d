#!/usr/bin/env bash
# Builds the Kubernetes binaries the tests run, from their Go modules (versions pinned in go.mod/go.sum):
# etcd, kube-apiserver, kube-controller-manager and kubectl for the API-only tier; kubelet, kube-scheduler,
# kube-proxy and the Pod sandbox's pause process for the real node (rlhf_operator.dev.cluster). Output goes
# to a cache directory outside the clone, keyed by the pinned inputs, so a warm machine skips the build.
# Prints the bin directory.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${RLHF_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-operator}"
key="$(cat "$here/go.mod" "$here/go.sum" "$here/etcd/main.go" "$here/pause/main.go" "$here/build.sh" | sha256sum | cut -c1-16)"
bin="$cache_root/controlplane-$key/bin"
if [[ -x "$bin/pause" ]]; then  # the last one built: the directory is complete
  echo "$bin"; exit 0
fi
# One build at a time: a second caller (make setup beside a test run) waits, then finds it done.
mkdir -p "$cache_root"
exec 9>"$cache_root/.controlplane-build.lock"
flock 9
if [[ -x "$bin/pause" ]]; then echo "$bin"; exit 0; fi
command -v go >/dev/null || { echo "build.sh: the Go toolchain is needed to build the test control plane" >&2; exit 1; }
echo "building the control plane into $bin (first run only; ~15-25 min on 2 cores)" >&2
tmp="$bin.partial.$$"
mkdir -p "$tmp"
cd "$here"
export GOFLAGS=-mod=mod CGO_ENABLED=0
go build -trimpath -ldflags='-s -w' -o "$tmp/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl \
  k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy >&2
go build -trimpath -ldflags='-s -w' -o "$tmp/etcd" ./etcd >&2
go build -trimpath -ldflags='-s -w' -o "$tmp/pause" ./pause >&2
rm -rf "$bin"; mv "$tmp" "$bin"
echo "$bin"
