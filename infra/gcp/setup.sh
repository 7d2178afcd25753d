#!/usr/bin/env bash
# One-time setup of a Google Cloud project for cloudbuild.yaml, for projects as Google creates
# them today. Idempotent: it creates what is missing and grants every role again, so run it
# again after an upgrade, or whenever in doubt.
#
#   infra/gcp/setup.sh PROJECT REGION CLUSTER CLUSTER_LOCATION
#   add --dry-run to print every command instead of running it
#
# It enables the APIs, creates the Artifact Registry repository, the events topic and four
# service accounts, and grants them exactly what the build and the product use:
#   egress-reconciler  the functions: reach the cluster (its RBAC is infra/rbac/), receive pushes
#   egress-exporter    the exporter in the cluster (Workload Identity): publish to the topic
#   egress-deployer    runs cloudbuild.yaml (`gcloud builds submit --service-account=...`)
#   egress-fn-builder  builds the functions' containers (--build-service-account)
# New projects' default build account holds no roles, and new organisations no longer let GKE
# nodes pull from Artifact Registry by default: this grants both explicitly. It finally prints
# the build command.
#
# Needs gcloud with its beta commands, signed in as someone who may enable APIs, create service
# accounts and grant roles in PROJECT (roles/owner, say). The cluster must exist.
# Environment: REPOSITORY (default egress-gateways), EVENTS_TOPIC (default egress-events),
# NODE_SERVICE_ACCOUNTS (the nodes' service accounts, space-separated; default: the cluster's).
set -euo pipefail

DRY_RUN=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    -*)
      printf 'unknown option %s (see --help)\n' "$arg" >&2
      exit 2
      ;;
    *) ARGS+=("$arg") ;;
  esac
done
if [ "${#ARGS[@]}" -ne 4 ]; then
  printf 'usage: %s [--dry-run] PROJECT REGION CLUSTER CLUSTER_LOCATION\n' "$0" >&2
  exit 2
fi
PROJECT=${ARGS[0]}
REGION=${ARGS[1]}
CLUSTER=${ARGS[2]}
CLUSTER_LOCATION=${ARGS[3]}
REPOSITORY=${REPOSITORY:-egress-gateways}
EVENTS_TOPIC=${EVENTS_TOPIC:-egress-events}
GATEWAY_NAMESPACE=egress-operator-system

say() { printf '[gcp] %s\n' "$*" >&2; }

# run and capture: print instead of running under --dry-run.
# shellcheck source-path=SCRIPTDIR source=../lib/dry-run.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/dry-run.sh"

# Whether a `gcloud ... describe` finds its resource (a dry run assumes it does not).
exists() {
  if [ "$DRY_RUN" = 1 ]; then
    run "$@"
    return 1
  fi
  "$@" >/dev/null 2>&1
}

# Run a grant, retrying while a just-created service account is not yet visible to IAM.
grant() {
  local attempt
  for attempt in 1 2 3 4 5; do
    if run "$@" --format=none; then
      return 0
    fi
    say "retrying in $((attempt * 5)) s: $*"
    sleep $((attempt * 5))
  done
  say "error: failed: $*"
  return 1
}

sa_email() { printf '%s@%s.iam.gserviceaccount.com' "$1" "$PROJECT"; }
RECONCILER=$(sa_email egress-reconciler)
EXPORTER=$(sa_email egress-exporter)
DEPLOYER=$(sa_email egress-deployer)
FN_BUILDER=$(sa_email egress-fn-builder)

project_role() { grant gcloud projects add-iam-policy-binding "$PROJECT" --member="$1" --role="$2" --condition=None; }
account_role() { grant gcloud iam service-accounts add-iam-policy-binding "$1" --project="$PROJECT" --member="$2" --role="$3" --condition=None; }
repository_role() {
  grant gcloud artifacts repositories add-iam-policy-binding "$REPOSITORY" --project="$PROJECT" \
    --location="$REGION" --member="$1" --role="$2" --condition=None
}

say "APIs"
run gcloud services enable --project="$PROJECT" \
  cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com \
  pubsub.googleapis.com cloudscheduler.googleapis.com artifactregistry.googleapis.com \
  container.googleapis.com iam.googleapis.com iamcredentials.googleapis.com \
  cloudresourcemanager.googleapis.com
NUMBER=$(capture 123456789 gcloud projects describe "$PROJECT" --format='value(projectNumber)')
# Pub/Sub's service agent mints the push subscriptions' tokens and forwards dead letters; it
# may not exist yet in a new project.
run gcloud beta services identity create --service=pubsub.googleapis.com --project="$PROJECT" \
  --format=none
PUBSUB_AGENT="service-$NUMBER@gcp-sa-pubsub.iam.gserviceaccount.com"

say "Artifact Registry repository $REPOSITORY"
if ! exists gcloud artifacts repositories describe "$REPOSITORY" --project="$PROJECT" --location="$REGION"; then
  run gcloud artifacts repositories create "$REPOSITORY" --project="$PROJECT" --location="$REGION" \
    --repository-format=docker --description="egress gateways: the exporter image"
fi

say "service accounts"
for pair in "egress-reconciler:egress gateways: the functions" \
  "egress-exporter:egress gateways: the exporter" \
  "egress-deployer:egress gateways: runs cloudbuild.yaml" \
  "egress-fn-builder:egress gateways: builds the functions"; do
  name=${pair%%:*}
  if ! exists gcloud iam service-accounts describe "$(sa_email "$name")" --project="$PROJECT"; then
    run gcloud iam service-accounts create "$name" --project="$PROJECT" --display-name="${pair#*:}"
  fi
done

say "the events topic (the exporter publishes to it from its first start)"
if ! exists gcloud pubsub topics describe "$EVENTS_TOPIC" --project="$PROJECT"; then
  run gcloud pubsub topics create "$EVENTS_TOPIC" --project="$PROJECT"
fi

say "roles of the reconciler (the functions)"
# The GKE API (the cluster's endpoint and CA) and the cluster's API server (as its email).
project_role "serviceAccount:$RECONCILER" roles/container.clusterViewer
# Pub/Sub pushes to on_event and on_sweep with the reconciler's identity token ...
project_role "serviceAccount:$RECONCILER" roles/run.invoker
# ... which Pub/Sub's service agent mints (granted by default only in older projects).
account_role "$RECONCILER" "serviceAccount:$PUBSUB_AGENT" roles/iam.serviceAccountTokenCreator

say "roles of the exporter"
account_role "$EXPORTER" "serviceAccount:$PROJECT.svc.id.goog[$GATEWAY_NAMESPACE/egress-exporter]" \
  roles/iam.workloadIdentityUser
grant gcloud pubsub topics add-iam-policy-binding "$EVENTS_TOPIC" --project="$PROJECT" \
  --member="serviceAccount:$EXPORTER" --role=roles/pubsub.publisher

say "roles of the deployer (runs cloudbuild.yaml)"
for role in cloudbuild.builds.builder cloudfunctions.developer pubsub.admin \
  cloudscheduler.admin container.admin; do
  project_role "serviceAccount:$DEPLOYER" "roles/$role"
done
repository_role "serviceAccount:$DEPLOYER" roles/artifactregistry.writer
# It deploys the functions as the reconciler (and pushes as it), built by the function builder.
account_role "$RECONCILER" "serviceAccount:$DEPLOYER" roles/iam.serviceAccountUser
account_role "$FN_BUILDER" "serviceAccount:$DEPLOYER" roles/iam.serviceAccountUser

say "roles of the function builder"
project_role "serviceAccount:$FN_BUILDER" roles/cloudbuild.builds.builder

say "the nodes of $CLUSTER may pull the exporter image"
if [ -z "${NODE_SERVICE_ACCOUNTS:-}" ]; then
  pools=$(capture default gcloud container node-pools list --cluster="$CLUSTER" \
    --location="$CLUSTER_LOCATION" --project="$PROJECT" --format='value(config.serviceAccount)')
  auto=$(capture "" gcloud container clusters describe "$CLUSTER" --location="$CLUSTER_LOCATION" \
    --project="$PROJECT" --format='value(autoscaling.autoprovisioningNodePoolDefaults.serviceAccount)')
  NODE_SERVICE_ACCOUNTS="$pools $auto"
fi
read -r -a node_accounts <<<"$(printf '%s\n' "$NODE_SERVICE_ACCOUNTS" | tr ' ' '\n' | sed '/^$/d' | sort -u | tr '\n' ' ')"
if [ "${#node_accounts[@]}" -eq 0 ]; then
  node_accounts=(default)
fi
for account in "${node_accounts[@]}"; do
  # "default" is the Compute Engine default service account.
  [ "$account" = default ] && account="$NUMBER-compute@developer.gserviceaccount.com"
  repository_role "serviceAccount:$account" roles/artifactregistry.reader
done

pool=$(capture "$PROJECT.svc.id.goog" gcloud container clusters describe "$CLUSTER" \
  --location="$CLUSTER_LOCATION" --project="$PROJECT" --format='value(workloadIdentityConfig.workloadPool)')
if [ -z "$pool" ]; then
  say "warning: $CLUSTER has no Workload Identity, which the exporter needs to publish:"
  say "  gcloud container clusters update $CLUSTER --location=$CLUSTER_LOCATION --workload-pool=$PROJECT.svc.id.goog"
  say "  (and on Standard clusters, --workload-metadata=GKE_METADATA on each node pool)"
fi

say "done. Build and deploy with:"
printf '%s\n' "gcloud builds submit --project=$PROJECT --config=cloudbuild.yaml \\" \
  "  --service-account=projects/$PROJECT/serviceAccounts/$DEPLOYER \\" \
  "  --substitutions=_REGION=$REGION,_CLUSTER=$CLUSTER,_CLUSTER_LOCATION=$CLUSTER_LOCATION"
