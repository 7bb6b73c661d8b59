#!/usr/bin/env bash
# Build the binaries the integration tests need (kube-apiserver, etcd, helm)
# from the Go module proxy into a cache directory outside the repository.
#
#   HERALD_TOOLS_DIR  cache directory (default: ~/.cache/herald-tools)
#
# Layout: $HERALD_TOOLS_DIR/k8s-vX/kube-apiserver, etcd-vX/etcd, helm-vX/helm,
# with symlinks in $HERALD_TOOLS_DIR/bin/. Each binary that already exists is
# skipped, so only the first run pays (kube-apiserver: ~3 min on 2 cores).
# Prints the bin directory on its last line of stdout.
set -euo pipefail

K8S_VERSION=v1.35.4
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.22.0

TOOLS_DIR="${HERALD_TOOLS_DIR:-$HOME/.cache/herald-tools}"
BIN_DIR="$TOOLS_DIR/bin"
mkdir -p "$BIN_DIR"

export CGO_ENABLED=0
export GOFLAGS=-buildvcs=false

log() { echo "build-tools: $*" >&2; }

# Staging modules of k8s.io/kubernetes 1.33 to 1.35, replaced by their
# published versions (the kubernetes go.mod points them at local paths).
STAGING=(
  api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
  cloud-provider cluster-bootstrap code-generator component-base
  component-helpers controller-manager cri-api cri-client csi-translation-lib
  dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
  kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
  mount-utils pod-security-admission sample-apiserver
)

# Write a wrapper module in $1 that requires module $2 at version $3 and
# imports package $4 from tools.go; extra go.mod text comes on stdin.
wrapper_module() {
  local dir=$1 module=$2 version=$3 pkg=$4
  {
    printf 'module local/heraldtools\n\ngo 1.26\n\ngodebug default=go1.25\n\n'
    printf 'require %s %s\n' "$module" "$version"
    cat
  } >"$dir/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$pkg" >"$dir/tools.go"
  (cd "$dir" && go mod tidy)
}

link() { ln -sfn "$1" "$BIN_DIR/$(basename "$1")"; }

build_kube_apiserver() {
  local out="$TOOLS_DIR/k8s-$K8S_VERSION/kube-apiserver"
  if [[ -x $out ]]; then
    log "kube-apiserver $K8S_VERSION already built"
  else
    log "building kube-apiserver $K8S_VERSION (takes minutes)"
    local tmp start=$SECONDS
    tmp=$(mktemp -d)
    local staging_version="v0.${K8S_VERSION#v1.}"
    {
      printf '\nreplace (\n'
      for m in "${STAGING[@]}"; do
        printf '\tk8s.io/%s => k8s.io/%s %s\n' "$m" "$m" "$staging_version"
      done
      printf ')\n'
    } | wrapper_module "$tmp" k8s.io/kubernetes "$K8S_VERSION" k8s.io/kubernetes/cmd/kube-apiserver
    local major minor
    major=$(cut -d. -f1 <<<"${K8S_VERSION#v}")
    minor=$(cut -d. -f2 <<<"$K8S_VERSION")
    mkdir -p "$(dirname "$out")"
    (cd "$tmp" && go build -trimpath -o "$out.tmp" \
      -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor" \
      k8s.io/kubernetes/cmd/kube-apiserver)
    mv "$out.tmp" "$out"
    rm -rf "$tmp"
    log "kube-apiserver built in $((SECONDS - start)) s"
  fi
  link "$out"
}

build_etcd() {
  local out="$TOOLS_DIR/etcd-$ETCD_VERSION/etcd"
  if [[ -x $out ]]; then
    log "etcd $ETCD_VERSION already built"
  else
    log "building etcd $ETCD_VERSION"
    local tmp start=$SECONDS
    tmp=$(mktemp -d)
    wrapper_module "$tmp" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 </dev/null
    mkdir -p "$(dirname "$out")"
    (cd "$tmp" && go build -trimpath -ldflags "-s -w" -o "$out.tmp" go.etcd.io/etcd/server/v3)
    mv "$out.tmp" "$out"
    rm -rf "$tmp"
    log "etcd built in $((SECONDS - start)) s"
  fi
  link "$out"
}

build_helm() {
  local dir="$TOOLS_DIR/helm-$HELM_VERSION"
  if [[ -x $dir/helm ]]; then
    log "helm $HELM_VERSION already built"
  else
    log "building helm $HELM_VERSION"
    local start=$SECONDS
    mkdir -p "$dir"
    GOBIN="$dir" go install -trimpath \
      -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
      "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    log "helm built in $((SECONDS - start)) s"
  fi
  link "$dir/helm"
}

build_etcd
build_helm
build_kube_apiserver

echo "$BIN_DIR"
