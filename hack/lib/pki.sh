# Certificates and an admin kubeconfig for the test control planes (sourced by
# hack/control-plane.sh and hack/test-cluster.sh).

# make_pki DIR SANS: in DIR, an ECDSA P-256 CA (ca.crt/key), a kube-apiserver serving
# certificate for the subjectAltName list SANS (apiserver.crt/key), an admin client certificate
# in system:masters (admin.crt/key) and an RSA service-account key pair (sa.key, sa.pub).
make_pki() {
  local dir=$1 sans=$2
  (
    cd "$dir"
    ec() { openssl ecparam -name prime256v1 -genkey -noout -out "$1" 2>/dev/null; }
    sign() { # name subject extensions
      ec "$1.key"
      openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
        -extfile <(printf '%s\n' "$3") -out "$1.crt" 2>/dev/null
    }
    ec ca.key
    openssl req -x509 -new -key ca.key -subj /CN=herald-test-ca -days 30 -out ca.crt 2>/dev/null
    sign apiserver /CN=kube-apiserver "subjectAltName=$sans
extendedKeyUsage=serverAuth"
    sign admin /CN=admin/O=system:masters 'extendedKeyUsage=clientAuth'
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

# write_kubeconfig DIR SERVER: DIR/kubeconfig for the admin certificate of make_pki.
write_kubeconfig() {
  local dir=$1 server=$2
  cat >"$dir/kubeconfig" <<EOF_KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: herald-test
  cluster: {server: "$server", certificate-authority: "$dir/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$dir/admin.crt", client-key: "$dir/admin.key"}
contexts:
- name: herald-test
  context: {cluster: herald-test, user: admin}
current-context: herald-test
EOF_KUBECONFIG
}
