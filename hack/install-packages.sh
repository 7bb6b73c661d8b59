#!/usr/bin/env bash
# Install the Debian packages the tests use, only those whose command (or file) is missing:
# Alertmanager, Prometheus, tinyproxy, PostgreSQL 15, python3-venv, procps, util-linux (unshare), and
# the test node's parts (buildah, podman, containerd, runc, the CNI plugins, iproute2, iptables, curl,
# openssl, and gcc with a static libc for the pause image), and Chromium, chromedriver and a CJK
# font for the console's browser tests and screenshots. Part of hack/test; needs root when
# something is missing.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

# command:package pairs; a package is installed when its command is missing.
need=()
for pair in \
  prometheus-alertmanager:prometheus-alertmanager prometheus:prometheus tinyproxy:tinyproxy-bin \
  buildah:buildah podman:podman containerd:containerd runc:runc ip:iproute2 iptables:iptables \
  curl:curl openssl:openssl gcc:gcc pgrep:procps unshare:util-linux /usr/lib/cni/bridge:containernetworking-plugins \
  /usr/lib/x86_64-linux-gnu/libc.a:libc6-dev /usr/lib/postgresql/15/bin/initdb:postgresql \
  chromium:chromium chromedriver:chromium-driver \
  /usr/share/fonts/truetype/wqy/wqy-microhei.ttc:fonts-wqy-microhei; do
  cmd=${pair%%:*} pkg=${pair##*:}
  if [[ $cmd == /* ]]; then [[ -e $cmd ]] && continue; else command -v "$cmd" >/dev/null && continue; fi
  [[ " ${need[*]} " == *" $pkg "* ]] || need+=("$pkg")
done
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "install-packages: missing Debian packages; run as root or install them: apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "all present" >&2
fi
