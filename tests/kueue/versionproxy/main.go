// Command versionproxy stands between Kueue and the node tier's API server: it forwards every request
// unchanged (watches streamed) and answers GET /version with the upstream's answer, its gitVersion
// replaced by a release version.
//
// Why: the test control plane is built from the Kubernetes Go modules without the release ldflags, so
// it reports gitVersion "v0.0.0-master+$Format:%H$", which Kueue's manager cannot parse as a semantic
// version and refuses to start on. Rebuilding the control plane with version ldflags would change its
// cache key and force the 20-minute build for every tier; this proxy touches only Kueue's view.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"io"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on (TLS)")
	upstream := flag.String("upstream", "", "the API server's URL")
	upstreamCA := flag.String("upstream-ca", "", "PEM file of the CA that signed the API server's certificate")
	certFile := flag.String("cert", "", "PEM certificate this proxy serves")
	keyFile := flag.String("key", "", "PEM key of -cert")
	gitVersion := flag.String("git-version", "", "the gitVersion /version reports, e.g. v1.34.4")
	flag.Parse()

	target, err := url.Parse(*upstream)
	if err != nil || target.Host == "" {
		log.Fatalf("-upstream %q: not a URL", *upstream)
	}
	caPEM, err := os.ReadFile(*upstreamCA)
	if err != nil {
		log.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		log.Fatalf("-upstream-ca %s: no PEM certificate", *upstreamCA)
	}
	transport := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, ForceAttemptHTTP2: true}

	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = transport
	proxy.FlushInterval = -1 // watches: pass every event on at once

	mux := http.NewServeMux()
	mux.Handle("/", proxy)
	mux.HandleFunc("/version", func(w http.ResponseWriter, r *http.Request) {
		req, err := http.NewRequestWithContext(r.Context(), http.MethodGet, target.JoinPath("/version").String(), nil)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		req.Header = r.Header.Clone()
		resp, err := transport.RoundTrip(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		info := map[string]any{}
		if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &info) != nil {
			w.WriteHeader(resp.StatusCode)
			_, _ = w.Write(body)
			return
		}
		info["gitVersion"] = *gitVersion
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(info)
	})
	log.Fatal(http.ListenAndServeTLS(*listen, *certFile, *keyFile, mux))
}
