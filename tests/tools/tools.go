//go:build tools

// Package tools pins the chart tooling built from this module (see build.sh): Helm itself and
// kubeconform (schema validation of rendered manifests, fed with schemas generated from the test
// API server's own OpenAPI because nothing can be downloaded at test time).
package tools

import (
	_ "github.com/yannh/kubeconform/cmd/kubeconform"
	_ "helm.sh/helm/v4/cmd/helm"
)
