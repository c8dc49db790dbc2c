#!/bin/sh
# Build and run the Go SDK conformance program against a live endpoint.
#   TENKI_API_ENDPOINT=http://127.0.0.1:PORT TENKI_API_KEY=tk_... conformance/go/run.sh
# Exits with the program's status (0 = every step passed). Needs Go >= 1.26; modules come
# through the Go module proxy (GOPROXY as configured), the SDK from ../../sdk/go.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
: "${TENKI_API_ENDPOINT:?set TENKI_API_ENDPOINT (tenki server status --json: grpc_endpoint)}"
: "${TENKI_API_KEY:?set TENKI_API_KEY (a tk_ key)}"
out=${TENKI_GO_CONFORMANCE_BIN:-"${TMPDIR:-/tmp}/tenki-go-conformance.$$"}
cleanup() { [ -n "${TENKI_GO_CONFORMANCE_BIN:-}" ] || rm -f "$out"; }
trap cleanup EXIT
(cd "$here" && go build -buildvcs=false -o "$out" .)
"$out" "$@"
