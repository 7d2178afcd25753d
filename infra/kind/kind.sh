#!/usr/bin/env bash
# The product on a kind cluster, for anyone with a container engine (Docker or Podman):
#
#   infra/kind/kind.sh up     # create the cluster, wire CoreDNS, install infra/, run the pipeline
#   infra/kind/kind.sh tokens # only re-mint the two identities' tokens and kubeconfigs
#   infra/kind/kind.sh down   # stop the Pub/Sub emulator and delete the cluster
#   add --dry-run to print every command instead of running it
#
# `up` creates (or reuses) the kind cluster, mounts our rules ConfigMap into kind's CoreDNS
# (infra/coredns), applies infra/overlays/kind (CRD, namespace, RBAC for two ServiceAccounts),
# mints a token for each identity and writes a kubeconfig per identity, starts the Pub/Sub
# emulator, and then runs the functions and the exporter locally (egressctl.kind_pipeline)
# until Ctrl-C. Unlike the local control plane, kind has nodes: gateway pods really run and
# DNS hijacking goes through kind's own CoreDNS. The reconciler adds the import line to kind's
# Corefile itself (MANAGE_COREDNS_IMPORT=true).
#
# Needs: kind, kubectl, docker or podman (KIND_EXPERIMENTAL_PROVIDER=podman), gcloud with the
# Pub/Sub emulator component (and Java), and the project's virtualenv (`make venv`).
# Environment: KIND_CLUSTER_NAME (default egress), KIND_STATE_DIR (default .cache/kind),
# PUBSUB_PORT (default 8685), TOKEN_DURATION (default 24h; rerun `up` when tokens expire).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NAME=${KIND_CLUSTER_NAME:-egress}
STATE=${KIND_STATE_DIR:-$REPO/.cache/kind}
PUBSUB_PORT=${PUBSUB_PORT:-8685}
TOKEN_DURATION=${TOKEN_DURATION:-24h}
GATEWAY_NS=egress-operator-system
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
DRY_RUN=0
COMMAND=""

usage() {
  sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

say() { printf '[kind] %s\n' "$*" >&2; }

# run and capture: print instead of running under --dry-run.
# shellcheck source-path=SCRIPTDIR source=../lib/dry-run.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/dry-run.sh"

need() {
  local tool
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      if [ "$DRY_RUN" = 1 ]; then
        say "note: $tool is not installed (fine for a dry run)"
      else
        say "error: $tool is required (see the top of $0)"
        exit 2
      fi
    fi
  done
}

need_engine() {
  if [ "${KIND_EXPERIMENTAL_PROVIDER:-}" = podman ]; then
    need podman
  else
    need docker
  fi
}

kctl() { run kubectl --kubeconfig "$STATE/kubeconfig" "$@"; }

# A kubeconfig for one ServiceAccount: the admin kubeconfig's cluster, the account's token.
# The token goes to a private file the kubeconfig points at (tokenFile), never onto a command
# line or into the output.
identity_kubeconfig() {
  local account=$1 out=$STATE/kubeconfig-$1 token_file=$STATE/token-$1 token
  token=$(capture "TOKEN-$account" kubectl --kubeconfig "$STATE/kubeconfig" -n "$GATEWAY_NS" \
    create token "$account" --duration "$TOKEN_DURATION")
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ (write the token to %q, mode 600)\n' "$token_file"
  else
    (umask 077 && printf '%s' "$token" >"$token_file")
  fi
  run cp "$STATE/kubeconfig" "$out"
  run kubectl --kubeconfig "$out" config set-credentials "$account"
  run kubectl --kubeconfig "$out" config set "users.$account.tokenFile" "$token_file"
  run kubectl --kubeconfig "$out" config set-context --current --user "$account"
  if [ "$DRY_RUN" = 0 ]; then
    chmod 600 "$out"
  fi
}

wait_for_port() {
  local port=$1 _
  if [ "$DRY_RUN" = 1 ]; then
    return 0
  fi
  for _ in $(seq 1 60); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 1
  done
  say "error: nothing listens on 127.0.0.1:$port after 60 s (see $STATE/pubsub.log)"
  exit 1
}

stop_emulator() {
  local pid
  if [ -f "$STATE/pubsub.pid" ]; then
    pid=$(cat "$STATE/pubsub.pid")
    # Only the process group this script started (recorded at start), never by name.
    run kill -- "-$pid" 2>/dev/null || true
    run rm -f "$STATE/pubsub.pid"
  fi
}

cmd_up() {
  need kind kubectl gcloud
  need_engine
  if [ "$DRY_RUN" = 0 ] && [ ! -x "$PYTHON" ]; then
    say "error: $PYTHON not found: run \`make venv\` first"
    exit 2
  fi
  run mkdir -p "$STATE"

  if [ "$DRY_RUN" = 0 ] && kind get clusters 2>/dev/null | grep -qx "$NAME"; then
    say "cluster $NAME exists: reusing it"
    run kind export kubeconfig --name "$NAME" --kubeconfig "$STATE/kubeconfig"
  else
    say "creating kind cluster $NAME"
    run kind create cluster --name "$NAME" --kubeconfig "$STATE/kubeconfig" --wait 120s
  fi

  say "installing infra/overlays/kind (CRD, namespace, RBAC)"
  kctl apply --server-side --field-manager=egress-kind -k "$REPO/infra/overlays/kind"
  kctl wait --for=condition=Established --timeout=60s crd/externalservices.egress.monzo.com

  say "wiring CoreDNS: mounting kube-system/egress-gateway-dns into kind's CoreDNS"
  kctl -n kube-system patch deployment coredns \
    --patch-file "$REPO/infra/coredns/deployment-patch.yaml"
  kctl -n kube-system rollout status deployment/coredns --timeout=120s
  say "CoreDNS: reload every 2 s instead of kind's default 30 s (README, How fast DNS changes)"
  local corefile
  corefile=$(capture "<kind's coredns ConfigMap>" \
    kubectl --kubeconfig "$STATE/kubeconfig" -n kube-system get configmap coredns -o yaml)
  if [ "$DRY_RUN" = 1 ]; then
    run kubectl --kubeconfig "$STATE/kubeconfig" apply --server-side --force-conflicts \
      --field-manager=egress-kind -f "<that ConfigMap with 'reload' -> 'reload 2s'>"
  else
    printf '%s\n' "$corefile" \
      | sed -E 's/^([[:space:]]+)reload[[:space:]]*$/\1reload 2s/' \
      | kctl apply --server-side --force-conflicts --field-manager=egress-kind -f -
  fi

  cmd_tokens

  say "starting the Pub/Sub emulator on 127.0.0.1:$PUBSUB_PORT"
  stop_emulator
  if [ "$DRY_RUN" = 1 ]; then
    run setsid gcloud beta emulators pubsub start --host-port="127.0.0.1:$PUBSUB_PORT" \
      --data-dir="$STATE/pubsub"
  else
    setsid gcloud beta emulators pubsub start --host-port="127.0.0.1:$PUBSUB_PORT" \
      --data-dir="$STATE/pubsub" >"$STATE/pubsub.log" 2>&1 &
    echo $! >"$STATE/pubsub.pid"
  fi
  wait_for_port "$PUBSUB_PORT"

  say "running the functions and the exporter locally (Ctrl-C stops them)"
  say "try: kubectl --kubeconfig $STATE/kubeconfig apply -f examples/google.yaml"
  local code=0
  run "$PYTHON" -m egressctl.kind_pipeline \
    --state-dir "$STATE" \
    --kubeconfig "$STATE/kubeconfig" \
    --reconciler-kubeconfig "$STATE/kubeconfig-egress-reconciler" \
    --exporter-kubeconfig "$STATE/kubeconfig-egress-exporter" \
    --pubsub-host "127.0.0.1:$PUBSUB_PORT" || code=$?
  stop_emulator
  say "pipeline stopped; the cluster keeps running (\`$0 down\` deletes it)"
  return "$code"
}

cmd_tokens() {
  need kubectl
  say "minting tokens for the reconciler and the exporter ($TOKEN_DURATION)"
  identity_kubeconfig egress-reconciler
  identity_kubeconfig egress-exporter
}

cmd_down() {
  need kind
  stop_emulator
  run kind delete cluster --name "$NAME"
  run rm -f "$STATE/kubeconfig" "$STATE/kubeconfig-egress-reconciler" \
    "$STATE/kubeconfig-egress-exporter" "$STATE/token-egress-reconciler" \
    "$STATE/token-egress-exporter"
}

while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    up | down | tokens) COMMAND=$1 ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
  shift
done

case $COMMAND in
  up) cmd_up ;;
  down) cmd_down ;;
  tokens) cmd_tokens ;;
  *)
    usage >&2
    exit 2
    ;;
esac
