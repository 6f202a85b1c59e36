#!/usr/bin/env bash
# Make a throw-away CA and a server certificate for localhost / 127.0.0.1 (for TLS tests).
#
# Usage: scripts/gen-test-cert.sh DIR
# Writes DIR/ca.pem (CA certificate: trust this), DIR/cert.pem + DIR/key.pem (server certificate + key,
# SAN DNS:localhost, IP:127.0.0.1, IP:::1) and DIR/ca-key.pem. Idempotent: keeps existing files while
# cert.pem verifies against ca.pem, matches key.pem and is valid for at least another day.
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
DIR=$1

if ! command -v openssl >/dev/null 2>&1; then
    echo "[gen-test-cert] openssl missing; installing it with apt-get" >&2
    SUDO=; [[ $(id -u) -eq 0 ]] || SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl
fi

mkdir -p "$DIR"
cd "$DIR"

valid() {
    [[ -s ca.pem && -s cert.pem && -s key.pem && -s ca-key.pem ]] || return 1
    openssl verify -CAfile ca.pem cert.pem >/dev/null 2>&1 || return 1
    openssl x509 -in cert.pem -noout -checkend 86400 >/dev/null 2>&1 || return 1
    openssl x509 -in ca.pem -noout -checkend 86400 >/dev/null 2>&1 || return 1
    [[ "$(openssl x509 -in cert.pem -noout -pubkey)" == "$(openssl pkey -in key.pem -pubout)" ]] || return 1
}

if valid; then
    echo "[gen-test-cert] $DIR: existing certificates are valid; keeping them" >&2
    exit 0
fi

TMP=$(mktemp -d "./.gen-test-cert.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

cat >"$TMP/ca.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = mailsender test CA
O = mailsender tests
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
CNF

cat >"$TMP/server.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = localhost
O = mailsender tests
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
CNF

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$TMP/ca-key.pem" 2>/dev/null
openssl req -new -x509 -sha256 -days 3650 -config "$TMP/ca.cnf" -key "$TMP/ca-key.pem" -out "$TMP/ca.pem"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$TMP/key.pem" 2>/dev/null
openssl req -new -sha256 -config "$TMP/server.cnf" -key "$TMP/key.pem" -out "$TMP/server.csr"
openssl x509 -req -sha256 -days 825 -in "$TMP/server.csr" -CA "$TMP/ca.pem" -CAkey "$TMP/ca-key.pem" \
    -set_serial "0x$(openssl rand -hex 16)" -extfile "$TMP/server.cnf" -extensions v3_server \
    -out "$TMP/cert.pem" 2>/dev/null
openssl verify -CAfile "$TMP/ca.pem" "$TMP/cert.pem" >/dev/null

chmod 600 "$TMP/ca-key.pem"
chmod 644 "$TMP/key.pem" "$TMP/cert.pem" "$TMP/ca.pem"
for f in ca-key.pem ca.pem key.pem cert.pem; do mv -f "$TMP/$f" "./$f"; done
echo "[gen-test-cert] $DIR: wrote ca.pem, cert.pem, key.pem (SAN localhost, 127.0.0.1, ::1), ca-key.pem" >&2
