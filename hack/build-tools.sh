#!/usr/bin/env bash
# Build the binaries the integration tests need (kube-apiserver, kubectl, kubelet,
# kube-controller-manager, kube-scheduler, etcd, helm) from the Go module proxy, and the
# node's pause image, into a cache directory outside the repository.
#
#   HERALD_TOOLS_DIR  cache directory (default: ~/.cache/herald-tools)
#
# Layout: $HERALD_TOOLS_DIR/k8s-vX/{kube-apiserver,kubectl,kubelet,...}, etcd-vX/etcd,
# helm-vX/helm, pause-vN/pause.tar, with symlinks in $HERALD_TOOLS_DIR/bin/. Each binary
# that already exists is skipped, so only the first run pays (the Kubernetes binaries:
# ~3 min for the first, ~1.5 min for each further one on 2 cores).
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
  local dir=$1 module=$2 version=$3
  shift 3
  {
    printf 'module local/heraldtools\n\ngo 1.26\n\ngodebug default=go1.25\n\n'
    printf 'require %s %s\n' "$module" "$version"
    cat
  } >"$dir/go.mod"
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    printf '\t_ "%s"\n' "$@"
    printf ')\n'
  } >"$dir/tools.go"
  (cd "$dir" && go mod tidy)
}

link() { ln -sfn "$1" "$BIN_DIR/$(basename "$1")"; }

# The Kubernetes binaries, all from one wrapper module of k8s.io/kubernetes (so they share
# one module download and one build cache).
K8S_COMMANDS=(kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler)

build_k8s() {
  local dir="$TOOLS_DIR/k8s-$K8S_VERSION" missing=() cmd
  for cmd in "${K8S_COMMANDS[@]}"; do
    [[ -x $dir/$cmd ]] || missing+=("$cmd")
  done
  if ((${#missing[@]} == 0)); then
    log "Kubernetes $K8S_VERSION binaries already built"
  else
    log "building ${missing[*]} $K8S_VERSION (takes minutes)"
    local tmp start=$SECONDS
    tmp=$(mktemp -d)
    local staging_version="v0.${K8S_VERSION#v1.}"
    local imports=()
    for cmd in "${K8S_COMMANDS[@]}"; do imports+=("k8s.io/kubernetes/cmd/$cmd"); done
    {
      printf '\nreplace (\n'
      for m in "${STAGING[@]}"; do
        printf '\tk8s.io/%s => k8s.io/%s %s\n' "$m" "$m" "$staging_version"
      done
      printf ')\n'
    } | wrapper_module "$tmp" k8s.io/kubernetes "$K8S_VERSION" "${imports[@]}"
    local major minor stamp
    major=$(cut -d. -f1 <<<"${K8S_VERSION#v}")
    minor=$(cut -d. -f2 <<<"$K8S_VERSION")
    stamp=""
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      stamp+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    done
    mkdir -p "$dir"
    for cmd in "${missing[@]}"; do
      local one=$SECONDS
      (cd "$tmp" && go build -trimpath -o "$dir/$cmd.tmp" -ldflags "-s -w$stamp" "k8s.io/kubernetes/cmd/$cmd")
      mv "$dir/$cmd.tmp" "$dir/$cmd"
      log "$cmd built in $((SECONDS - one)) s"
    done
    rm -rf "$tmp"
    log "Kubernetes binaries built in $((SECONDS - start)) s"
  fi
  for cmd in "${K8S_COMMANDS[@]}"; do link "$dir/$cmd"; done
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

# The node's pause image (the pod sandbox's first process): a static C program that sleeps
# until SIGTERM, in an image from scratch, saved as a docker-archive that the test node's
# containerd imports. Needs gcc (with static libc) and buildah.
PAUSE_VERSION=1
PAUSE_IMAGE="localhost/herald-pause:$PAUSE_VERSION"

build_pause() {
  local dir="$TOOLS_DIR/pause-v$PAUSE_VERSION"
  if [[ -s $dir/pause.tar ]]; then
    log "pause image $PAUSE_IMAGE already built"
  else
    log "building pause image $PAUSE_IMAGE"
    local tmp
    tmp=$(mktemp -d)
    cat >"$tmp/pause.c" <<'EOF_C'
#include <signal.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

int main(void) {
  signal(SIGTERM, stop);
  signal(SIGINT, stop);
  for (;;) pause();
}
EOF_C
    gcc -static -O2 -o "$tmp/pause" "$tmp/pause.c"
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$tmp/Containerfile"
    mkdir -p "$dir"
    buildah --storage-driver vfs bud --quiet -t "$PAUSE_IMAGE" -f "$tmp/Containerfile" "$tmp" >/dev/null
    rm -f "$dir/pause.tar.tmp"
    buildah --storage-driver vfs push --quiet "$PAUSE_IMAGE" "docker-archive:$dir/pause.tar.tmp:$PAUSE_IMAGE"
    mv "$dir/pause.tar.tmp" "$dir/pause.tar"
    rm -rf "$tmp"
  fi
  ln -sfn "$dir/pause.tar" "$BIN_DIR/pause.tar"
}

build_etcd
build_helm
build_k8s
build_pause

echo "$BIN_DIR"
