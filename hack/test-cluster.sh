#!/usr/bin/env bash
# A one-node Kubernetes cluster on this machine, for the pod tests and for poking at by hand:
# etcd, kube-apiserver, kube-controller-manager and kube-scheduler in this network namespace,
# and a node (containerd + kubelet, pods on a CNI bridge) in a network namespace of its own.
#
#   hack/test-cluster.sh up DIR     start everything in the empty directory DIR; returns once
#                                   the node is Ready and prints `export KUBECONFIG=DIR/kubeconfig`
#   hack/test-cluster.sh down DIR   stop everything, undo every mount, namespace and link,
#                                   and remove DIR (safe to run twice, or after a failed `up`)
#
# Needs root, the tools of hack/build-tools.sh ($HERALD_TOOLS_DIR/bin) and the Debian packages
# containerd, runc, containernetworking-plugins, iproute2 and iptables (hack/test installs them).
#
# Network (N is picked per cluster, so clusters never share addresses):
#   10.213.N.1   this side of a veth pair: kube-apiserver (:6443) listens here, and so can test
#                sinks that pods must reach
#   10.213.N.2   the node's side, in network namespace herald-node-N: the node address (kubelet
#                :10250, so `kubectl logs` works)
#   10.214.N.0/24  pod addresses, on bridge cni0 inside the node's namespace; this namespace
#                routes them through the veth
#   10.215.N.0/24  Service addresses. No kube-proxy runs: one DNAT rule in the node's namespace
#                sends the `kubernetes` Service (10.215.N.1:443) to kube-apiserver, which is what
#                in-cluster clients (KUBERNETES_SERVICE_HOST) use; other Services have no
#                forwarding, so tests talk to pod addresses.
set -Eeuo pipefail

cmd=${1:-} D=${2:-}
[[ ($cmd == up || $cmd == down) && -n $D ]] || {
  echo "usage: $0 up|down DIR" >&2
  exit 2
}
BIN="${HERALD_TOOLS_DIR:-$HOME/.cache/herald-tools}/bin"
CNI_BIN=/usr/lib/cni
PAUSE_IMAGE=localhost/herald-pause:1
NODE_NAME=herald-node
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "test-cluster: $*" >&2; }

# Stop the process whose id is in DIR/pids/$1: SIGTERM, up to $2 tenths of a second, SIGKILL.
stop() {
  local file="$D/pids/$1" pid
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq "${2:-50}"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  [[ -d $D ]] || return 0
  # shellcheck disable=SC1091
  [[ -f $D/env ]] && source "$D/env"
  local ctr=(ctr --address "$D/containerd.sock" --namespace k8s.io)
  stop kube-controller-manager 30
  stop kube-scheduler 30
  # Let the kubelet stop the pods the proper way (CNI teardown, volume unmounts), bounded.
  if [[ -f $D/pids/kubelet && -f $D/pids/kube-apiserver ]] && kill -0 "$(cat "$D/pids/kubelet")" 2>/dev/null; then
    timeout 20 "$BIN/kubectl" --kubeconfig "$D/kubeconfig" delete pods --all --all-namespaces \
      --force --grace-period=0 --wait=false >/dev/null 2>&1 || true
    for _ in $(seq 150); do
      [[ -z $(timeout 5 "${ctr[@]}" tasks ls -q 2>/dev/null) ]] && break
      sleep 0.2
    done
  fi
  stop kubelet 50
  # Whatever still runs: kill and delete each task through containerd.
  if [[ -f $D/pids/containerd ]]; then
    local task
    for task in $(timeout 5 "${ctr[@]}" tasks ls -q 2>/dev/null); do
      timeout 5 "${ctr[@]}" tasks kill -a -s SIGKILL "$task" >/dev/null 2>&1 || true
    done
    sleep 0.5
    for task in $(timeout 5 "${ctr[@]}" tasks ls -q 2>/dev/null); do
      timeout 10 "${ctr[@]}" tasks delete -f "$task" >/dev/null 2>&1 || true
    done
  fi
  stop containerd 50
  # containerd's shims outlive it; each names this cluster's socket on its command line.
  local file pid
  for file in $(grep -laF -- "$D/containerd.sock" /proc/[0-9]*/cmdline 2>/dev/null); do
    pid=${file#/proc/} pid=${pid%/cmdline}
    [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == */containerd-shim* ]] || continue
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Containers whose shim is gone (containerd killed before it could stop them): runc's
  # state names this cluster's directory as the bundle.
  local runc_root=/run/containerd/runc/k8s.io state
  for state in "$runc_root"/*/state.json; do
    [[ -f $state ]] && grep -qF -- "$D/" "$state" || continue
    timeout 10 runc --root "$runc_root" delete -f "$(basename "$(dirname "$state")")" >/dev/null 2>&1 || true
  done
  # Pod network namespaces made while this cluster ran (containerd names them cni-UUID).
  if [[ -f $D/netns-before ]]; then
    local ns
    for ns in /run/netns/cni-*; do
      [[ -e $ns ]] || continue
      grep -qxF "$ns" "$D/netns-before" && continue
      umount "$ns" 2>/dev/null || true
      rm -f "$ns"
    done
  fi
  # Every mount under DIR (container root filesystems, volumes), deepest first.
  local mounts m
  for _ in 1 2 3; do
    mounts=$(awk -v d="$D/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
    [[ -z $mounts ]] && break
    for m in $mounts; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  done
  # The node's namespace holds the bridge, the pods' veth ends, the DNAT rule and the node's
  # end of the veth pair: deleting it removes them, this side's link and its route.
  if [[ -n ${NETNS:-} ]]; then
    ip netns delete "$NETNS" 2>/dev/null || true
    ip link delete "${HOST_LINK:-none}" 2>/dev/null || true
  fi
  stop kube-apiserver 100
  stop etcd 50
  rm -rf "$D"
}

if [[ $cmd == down ]]; then
  down
  exit 0
fi

# ---------------------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------------------
[[ $(id -u) == 0 ]] || { log "needs root (network namespaces, mounts, containerd)"; exit 1; }
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl pause.tar; do
  [[ -e $BIN/$b ]] || { log "$BIN/$b missing: run hack/build-tools.sh"; exit 1; }
done
for b in containerd ctr runc ip iptables nsenter; do
  command -v "$b" >/dev/null || { log "$b missing: run hack/test (it installs the Debian packages)"; exit 1; }
done
for p in bridge host-local loopback; do
  [[ -x $CNI_BIN/$p ]] || { log "$CNI_BIN/$p missing: apt-get install -y containernetworking-plugins"; exit 1; }
done
mkdir -p "$D/pids"
D=$(cd "$D" && pwd)
trap 'log "failed; cleaning up"; down' ERR

# A free N: no namespace, link or address of another cluster uses it.
N=""
for _ in $(seq 50); do
  n=$((RANDOM % 230 + 20))
  if [[ ! -e /run/netns/herald-node-$n ]] && ! ip link show "hn$n" >/dev/null 2>&1 &&
    ! ip -o addr show | grep -qF " 10.213.$n."; then
    N=$n
    break
  fi
done
[[ -n $N ]] || { log "no free address block"; exit 1; }
HOST_IP=10.213.$N.1 NODE_IP=10.213.$N.2 POD_CIDR=10.214.$N.0/24 SERVICE_CIDR=10.215.$N.0/24
SERVICE_IP=10.215.$N.1 NETNS=herald-node-$N HOST_LINK=hn$N
cat >"$D/env" <<EOF
N=$N
HOST_IP=$HOST_IP
NODE_IP=$NODE_IP
POD_CIDR=$POD_CIDR
SERVICE_CIDR=$SERVICE_CIDR
SERVICE_IP=$SERVICE_IP
NETNS=$NETNS
HOST_LINK=$HOST_LINK
NODE_NAME=$NODE_NAME
EOF
(ls -d /run/netns/cni-* 2>/dev/null || true) >"$D/netns-before"

# Start "$@" in the background, in a session of its own (a signal to the caller's process
# group, e.g. Ctrl-C or a timeout, leaves it to `down`), with its output in DIR/$name.log;
# its pid goes to DIR/pids.
spawn() {
  local name=$1
  shift
  setsid "$@" </dev/null >"$D/$name.log" 2>&1 &
  echo $! >"$D/pids/$name"
}
in_node() { nsenter --net="/run/netns/$NETNS" -- "$@"; }

# Wait up to $2 tenths of a second for the command after it to succeed; fail with a log tail.
wait_for() {
  local what=$1 tenths=$2 logfile=$3
  shift 3
  for _ in $(seq "$tenths"); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "$what not ready after $((tenths / 10)) s; last lines of $logfile:"
  tail -n 30 "$logfile" >&2 || true
  return 1
}

# -- network -----------------------------------------------------------------------------
ip netns add "$NETNS"
ip link add "$HOST_LINK" type veth peer name eth0 netns "$NETNS"
ip addr add "$HOST_IP/30" dev "$HOST_LINK"
ip link set "$HOST_LINK" up
in_node ip link set lo up
in_node ip addr add "$NODE_IP/30" dev eth0
in_node ip link set eth0 up
in_node sysctl -qw net.ipv4.ip_forward=1
ip route add "$POD_CIDR" via "$NODE_IP" dev "$HOST_LINK"
in_node iptables -t nat -A PREROUTING -d "$SERVICE_IP/32" -p tcp --dport 443 \
  -j DNAT --to-destination "$HOST_IP:6443"

# -- certificates ------------------------------------------------------------------------
# shellcheck source=hack/lib/pki.sh
source "$(dirname "$0")/lib/pki.sh"
make_pki "$D" "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:$HOST_IP,IP:$SERVICE_IP"
write_kubeconfig "$D" "https://$HOST_IP:6443"
cd "$D"

# -- control plane -----------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
E=$(free_port) Q=$(free_port)
spawn etcd "$BIN/etcd" --name herald-test --data-dir "$D/etcd-data" \
  --listen-client-urls "http://127.0.0.1:$E" --advertise-client-urls "http://127.0.0.1:$E" \
  --listen-peer-urls "http://127.0.0.1:$Q" --initial-advertise-peer-urls "http://127.0.0.1:$Q" \
  --initial-cluster "herald-test=http://127.0.0.1:$Q" --unsafe-no-fsync
wait_for etcd 300 "$D/etcd.log" curl -fsS "http://127.0.0.1:$E/health"

spawn kube-apiserver "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$E" --cert-dir "$D" \
  --tls-cert-file "$D/apiserver.crt" --tls-private-key-file "$D/apiserver.key" \
  --secure-port 6443 --bind-address "$HOST_IP" --advertise-address "$HOST_IP" \
  --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=true \
  --authorization-mode Node,RBAC \
  --service-account-issuer "https://kubernetes.default.svc" \
  --service-account-key-file "$D/sa.pub" --service-account-signing-key-file "$D/sa.key" \
  --client-ca-file "$D/ca.crt" \
  --kubelet-client-certificate "$D/admin.crt" --kubelet-client-key "$D/admin.key" \
  --kubelet-preferred-address-types InternalIP
wait_for kube-apiserver 900 "$D/kube-apiserver.log" \
  curl -fsS --cacert ca.crt --cert admin.crt --key admin.key "https://$HOST_IP:6443/readyz"

spawn kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$D/kubeconfig" \
  --authentication-kubeconfig "$D/kubeconfig" --authorization-kubeconfig "$D/kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$(free_port)" --leader-elect=false \
  --service-account-private-key-file "$D/sa.key" --root-ca-file "$D/ca.crt" \
  --use-service-account-credentials=false --controllers '*'
spawn kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$D/kubeconfig" \
  --authentication-kubeconfig "$D/kubeconfig" --authorization-kubeconfig "$D/kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$(free_port)" --leader-elect=false

# -- node ----------------------------------------------------------------------------------
mkdir -p "$D/cni" "$D/containerd/root" "$D/containerd/state" "$D/kubelet" "$D/cni-ipam"
cat >"$D/cni/10-herald.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "herald-test",
  "plugins": [
    {
      "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$D/cni-ipam",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
cat >"$D/containerd.toml" <<EOF
version = 2
root = "$D/containerd/root"
state = "$D/containerd/state"
[grpc]
  address = "$D/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$D/cni"
EOF
spawn containerd nsenter --net="/run/netns/$NETNS" -- containerd --config "$D/containerd.toml"
wait_for containerd 300 "$D/containerd.log" ctr --address "$D/containerd.sock" version
ctr --address "$D/containerd.sock" --namespace k8s.io images import "$BIN/pause.tar" >/dev/null

cat >"$D/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
containerRuntimeEndpoint: unix://$D/containerd.sock
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $D/ca.crt}
authorization: {mode: AlwaysAllow}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# A busy CI disk must not evict the test pods: no disk or memory eviction thresholds.
evictionHard: {memory.available: "0%", nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%"}
serializeImagePulls: false
resolvConf: /etc/resolv.conf
EOF
spawn kubelet nsenter --net="/run/netns/$NETNS" -- "$BIN/kubelet" --config "$D/kubelet.yaml" --kubeconfig "$D/kubeconfig" \
  --root-dir "$D/kubelet" --cert-dir "$D/kubelet-pki" --hostname-override "$NODE_NAME" \
  --node-ip "$NODE_IP"
node_ready() {
  [[ $("$BIN/kubectl" --kubeconfig "$D/kubeconfig" get node "$NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}
wait_for "node $NODE_NAME" 1200 "$D/kubelet.log" node_ready
# The ServiceAccount `default` of `default`, made by the controller-manager, shows the
# controllers run.
wait_for kube-controller-manager 600 "$D/kube-controller-manager.log" \
  "$BIN/kubectl" --kubeconfig "$D/kubeconfig" -n default get serviceaccount default
trap - ERR
log "ready: node $NODE_NAME at $NODE_IP, pods in $POD_CIDR, kube-apiserver https://$HOST_IP:6443; logs in $D"
echo "export KUBECONFIG=$D/kubeconfig"
