#!/usr/bin/env bash
# Build the local control plane's binaries from the pinned Go modules under infra/dev/go/.
#
# Why: there is no container engine here (no kind), so the dev stack runs real
# kube-apiserver, kube-controller-manager, etcd and CoreDNS processes, built from source
# through the Go module proxy. Binaries are cached OUTSIDE the clone, keyed by a hash of
# the pins (go.mod/go.sum of every tool module, this script and the Go version), so a
# fresh clone (CI) reuses them and a pin change rebuilds.
#
# Usage:
#   infra/dev/build.sh              build if needed; last stdout line is the binary dir
#   infra/dev/build.sh --print-dir  print the binary dir (built or not) and exit
#   infra/dev/build.sh --check      exit 0 if the binaries for the current pins exist
#
# Progress goes to stderr, so callers can read the directory from stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
modules="$here/go"
GO="${GO:-}"
if [[ -z "$GO" ]]; then
  if command -v go >/dev/null 2>&1; then GO="$(command -v go)"; else GO=/usr/local/go/bin/go; fi
fi
export GOTOOLCHAIN=local   # never fetch another toolchain; the pins must build with this Go
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=0
# Bump when the way binaries are built changes (flags, targets): part of the cache key.
recipe=1

go_version="$("$GO" env GOVERSION)"
key="$(
  {
    echo "$go_version recipe=$recipe"
    for f in "$modules"/*/go.mod "$modules"/*/go.sum; do echo "== ${f#"$modules"/}"; cat "$f"; done
  } | sha256sum | cut -c1-16
)"
cache_root="${EGRESS_BIN_CACHE:-$HOME/.cache/egress-gateways/bin}"
out="$cache_root/$key"
# Go's compile cache lives beside the binaries (one directory for CI to cache) unless set.
export GOCACHE="${GOCACHE:-$cache_root/.go-build}"

# name|module dir|package
targets=(
  "etcd|etcd|go.etcd.io/etcd/server/v3"
  "coredns|coredns|github.com/coredns/coredns"
  "kube-apiserver|kubernetes|k8s.io/kubernetes/cmd/kube-apiserver"
  "kube-controller-manager|kubernetes|k8s.io/kubernetes/cmd/kube-controller-manager"
  "kube-scheduler|kubernetes|k8s.io/kubernetes/cmd/kube-scheduler"
  "kube-proxy|kubernetes|k8s.io/kubernetes/cmd/kube-proxy"
  "kubelet|kubernetes|k8s.io/kubernetes/cmd/kubelet"
  "kube-router|kube-router|github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"
)

case "${1:-}" in
  --print-dir) echo "$out"; exit 0 ;;
  --check) [[ -f "$out/.complete" ]] && exit 0 || exit 1 ;;
  "") ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac

log() { printf '[build %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if [[ -f "$out/.complete" ]]; then
  log "binaries for pins $key are cached in $out"
  echo "$out"
  exit 0
fi

mkdir -p "$out"
# One build at a time per cache key (a test session and `dev up` may race).
exec 9>"$out/.lock"
if ! flock -n 9; then
  log "another build of $key is running; waiting for it"
  flock 9
fi
if [[ -f "$out/.complete" ]]; then echo "$out"; exit 0; fi

log "building pins $key with $go_version into $out (first build takes several minutes)"
started=$SECONDS
for t in "${targets[@]}"; do
  IFS='|' read -r name mod pkg <<<"$t"
  if [[ -x "$out/$name" ]]; then
    log "$name: already built"
    continue
  fi
  log "$name: compiling $pkg (fetches missing modules first)"
  t0=$SECONDS
  # Build sequentially (2-core machines); a ticker shows the build is alive.
  (
    cd "$modules/$mod"
    "$GO" build -trimpath -ldflags="-s -w" -o "$out/$name.tmp" "$pkg"
  ) &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    # Returns when the build ends or after 30 s, whichever is first.
    timeout 30 tail --pid="$pid" -f /dev/null || true
    kill -0 "$pid" 2>/dev/null && log "$name: still compiling ($((SECONDS - t0))s)"
  done
  if ! wait "$pid"; then
    log "$name: BUILD FAILED (see the go output above)"
    exit 1
  fi
  mv "$out/$name.tmp" "$out/$name"
  log "$name: done in $((SECONDS - t0))s ($(du -h "$out/$name" | cut -f1))"
done
{
  echo "go=$go_version"
  for d in "$modules"/*/; do
    grep -hE '^\s*(k8s.io/kubernetes|go.etcd.io/etcd/server/v3|github.com/coredns/coredns|github.com/cloudnativelabs/kube-router/v2) v' "$d/go.mod" || true
  done
} >"$out/PINS"
touch "$out/.complete"
log "all binaries built in $((SECONDS - started))s"
echo "$out"
