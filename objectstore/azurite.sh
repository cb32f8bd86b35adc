#!/usr/bin/env bash
# A local Azure Blob store (the Azurite emulator) that idiff reaches through its ordinary az:// paths.
#
# blobfile has no endpoint setting: it always asks https://ACCOUNT.blob.core.windows.net. So this script
# serves Azurite under that very name: a private CA and a TLS certificate for the name, the CA trusted by the
# system store (where Python's ssl looks), and the name pointed at 127.0.0.1 in /etc/hosts. Every process on
# the machine (idiff's ranks, data-loader workers, subprocesses) then talks to the emulator unchanged.
#
#   sudo bash objectstore/azurite.sh start    # install node/npm/azurite if missing, start, create containers
#   sudo bash objectstore/azurite.sh pause    # end the server only (the store is away); start brings it back
#   sudo bash objectstore/azurite.sh stop     # end the server, undo /etc/hosts and the CA; blobs are kept
#   bash objectstore/azurite.sh status | env  # running?  /  the variables a client exports
#
# Environment: AZURITE_DIR (state: certificates, blobs, log; default /var/tmp/idiff-azurite),
# AZURITE_CONTAINERS (created at start, default "idiff").
set -euo pipefail

ACCOUNT=devstoreaccount1
# Azurite's published development key: the same on every installation, not a secret.
KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
HOST="$ACCOUNT.blob.core.windows.net"
DIR="${AZURITE_DIR:-/var/tmp/idiff-azurite}"
CONTAINERS="${AZURITE_CONTAINERS:-idiff}"
MARK="# idiff-azurite"
CA_DST=/usr/local/share/ca-certificates/idiff-azurite-ca.crt
PIDFILE="$DIR/azurite.pid"
HERE="$(cd "$(dirname "$0")" && pwd)"

log() { echo "azurite: $*" >&2; }
need_root() { [[ $(id -u) == 0 ]] || { log "$1 needs root (port 443, /etc/hosts, the CA store)"; exit 1; }; }

# The recorded process, if it is alive and still Azurite (a pid may be reused).
running() {
  [[ -f $PIDFILE ]] || return 1
  local pid; pid=$(cat "$PIDFILE")
  kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q azurite-blob
}

print_env() {
  echo "export AZURE_STORAGE_ACCOUNT=$ACCOUNT"
  echo "export AZURE_STORAGE_KEY='$KEY'"
  echo "# paths: az://$ACCOUNT/<container>/...   containers: $CONTAINERS"
}

install() {
  local pkgs=()
  command -v openssl >/dev/null || pkgs+=(openssl)
  command -v update-ca-certificates >/dev/null || pkgs+=(ca-certificates)
  command -v python3 >/dev/null || pkgs+=(python3)
  command -v node >/dev/null || pkgs+=(nodejs)
  command -v npm >/dev/null || pkgs+=(npm)
  if (( ${#pkgs[@]} )); then
    log "apt-get install ${pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  fi
  if ! command -v azurite-blob >/dev/null; then
    log "npm install -g azurite"
    npm install -g --no-fund --no-audit azurite >/dev/null
  fi
}

make_certificates() {
  [[ -f $DIR/server.crt && -f $DIR/ca.crt ]] && return 0
  log "a CA and a certificate for $HOST in $DIR"
  (
    cd "$DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 -keyout ca.key -out ca.crt \
      -subj "/CN=idiff azurite local CA" -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -sha256 -keyout server.key -out server.csr -subj "/CN=$HOST" 2>/dev/null
    # SAN, serverAuth and the key identifiers: newer Pythons verify with VERIFY_X509_STRICT
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" "subjectAltName=DNS:$HOST,DNS:localhost,IP:127.0.0.1" \
      "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid,issuer" > server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -sha256 \
      -extfile server.ext -out server.crt 2>/dev/null
  )
}

trust_and_route() {
  if ! cmp -s "$DIR/ca.crt" "$CA_DST"; then
    cp "$DIR/ca.crt" "$CA_DST"
    update-ca-certificates >/dev/null 2>&1
  fi
  # appended, not sed -i: /etc/hosts is often a bind mount, which cannot be renamed over
  grep -q "$MARK" /etc/hosts || echo "127.0.0.1 $HOST $MARK" >> /etc/hosts
}

untrust_and_unroute() {
  if grep -q "$MARK" /etc/hosts; then
    local kept; kept=$(grep -v "$MARK" /etc/hosts || true)
    printf '%s\n' "$kept" > /etc/hosts
  fi
  if [[ -f $CA_DST ]]; then rm -f "$CA_DST"; update-ca-certificates >/dev/null 2>&1; fi
}

end_server() {
  running || { rm -f "$PIDFILE"; return 0; }
  local pid; pid=$(cat "$PIDFILE")
  kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$PIDFILE"
  log "ended azurite-blob (pid $pid)"
}

start() {
  need_root start
  install
  mkdir -p "$DIR/data"
  make_certificates
  trust_and_route
  if running; then
    log "already running (pid $(cat "$PIDFILE"))"
  else
    if (exec 3<>/dev/tcp/127.0.0.1/443) 2>/dev/null; then log "port 443 is taken by another process"; exit 1; fi
    # setsid: the server outlives this script, and a Ctrl-C in the caller's terminal does not reach it
    setsid azurite-blob --blobHost 127.0.0.1 --blobPort 443 --cert "$DIR/server.crt" --key "$DIR/server.key" \
      --loose --skipApiVersionCheck --disableTelemetry --location "$DIR/data" \
      > "$DIR/azurite.log" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    log "started azurite-blob (pid $!), log $DIR/azurite.log"
  fi
  # blobfile cannot create a container: a Shared Key signed PUT does, once the server answers
  AZURE_STORAGE_ACCOUNT=$ACCOUNT AZURE_STORAGE_KEY=$KEY python3 "$HERE/containers.py" $CONTAINERS
}

case "${1:-}" in
  start) start; print_env ;;
  pause) need_root pause; end_server ;;
  stop) need_root stop; end_server; untrust_and_unroute ;;
  status) if running; then echo "running (pid $(cat "$PIDFILE"))"; else echo "stopped"; exit 1; fi ;;
  env) print_env ;;
  *) echo "usage: $0 start|pause|stop|status|env" >&2; exit 2 ;;
esac
