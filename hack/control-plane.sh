#!/usr/bin/env bash
# Start the integration tests' control plane (etcd + kube-apiserver on
# loopback) in the foreground, for poking at it by hand:
#
#   hack/control-plane.sh            # prints: export KUBECONFIG=...
#   kubectl --kubeconfig <printed path> get ns
#
# Ctrl-C stops both processes and removes the temporary directory.
# Binaries come from hack/build-tools.sh ($HERALD_TOOLS_DIR/bin).
set -euo pipefail

BIN="${HERALD_TOOLS_DIR:-$HOME/.cache/herald-tools}/bin"
for b in etcd kube-apiserver; do
  [[ -x $BIN/$b ]] || { echo "$BIN/$b missing: run hack/build-tools.sh" >&2; exit 1; }
done

D=$(mktemp -d -t herald-control-plane-XXXXXX)
pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 100); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
E=$(free_port) Q=$(free_port) P=$(free_port)

# Certificates: ECDSA P-256 CA, serving cert, admin client cert, SA key pair.
# shellcheck source=hack/lib/pki.sh
source "$(dirname "$0")/lib/pki.sh"
make_pki "$D" "DNS:localhost,IP:127.0.0.1"
cd "$D"

"$BIN/etcd" --data-dir "$D/etcd-data" --listen-client-urls "http://127.0.0.1:$E" \
  --advertise-client-urls "http://127.0.0.1:$E" --listen-peer-urls "http://127.0.0.1:$Q" \
  --initial-advertise-peer-urls "http://127.0.0.1:$Q" --initial-cluster "default=http://127.0.0.1:$Q" \
  --unsafe-no-fsync >"$D/etcd.log" 2>&1 &
pids+=($!)
"$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$E" --cert-dir "$D" \
  --tls-cert-file "$D/apiserver.crt" --tls-private-key-file "$D/apiserver.key" \
  --secure-port "$P" --bind-address 127.0.0.1 --advertise-address 127.0.0.1 \
  --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
  --disable-admission-plugins ServiceAccount --authorization-mode RBAC \
  --service-account-issuer "https://127.0.0.1:$P/" --service-account-key-file "$D/sa.pub" \
  --service-account-signing-key-file "$D/sa.key" --client-ca-file "$D/ca.crt" \
  >"$D/kube-apiserver.log" 2>&1 &
pids+=($!)

write_kubeconfig "$D" "https://127.0.0.1:$P"

for _ in $(seq 600); do
  if [[ $(curl -s --cacert ca.crt --cert admin.crt --key admin.key "https://127.0.0.1:$P/readyz" || true) == ok ]]; then
    echo "control plane ready; logs in $D"
    echo "export KUBECONFIG=$D/kubeconfig"
    echo "Ctrl-C to stop"
    wait -n "${pids[@]}" || true
    echo "a process exited; see $D/*.log" >&2
    tail -n 20 "$D"/*.log >&2
    exit 1
  fi
  sleep 0.1
done
echo "kube-apiserver not ready after 60 s:" >&2
tail -n 30 "$D/kube-apiserver.log" >&2
exit 1
