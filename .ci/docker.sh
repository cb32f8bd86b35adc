#!/usr/bin/env bash
# The container image in CI, from Debian's packages and PyPI only (no registry is needed): Debian's
# docker engine, a dockerd of our own, a Debian 12 base image made with debootstrap, and
# docker/Dockerfile built on it. .ci/run calls it with DOCKER_HOST (unix://DIR/docker.sock: DIR
# holds the daemon's socket, pid file and exec root) and IDIFF_TEST_IMAGE (the tag to build):
#
#   bash .ci/docker.sh start     # install docker.io and debootstrap if missing, start dockerd
#   bash .ci/docker.sh build     # base image (cached), then docker/Dockerfile on it
#   bash .ci/docker.sh stop      # stop that dockerd by its pid, remove DIR
#
# The daemon touches nothing on the host's network: no bridge, no iptables rules, no ip_forward.
# Builds and containers that need the network use the host's (--network host).
# Kept between runs in $IDIFF_CI_CACHE: the Debian root file system and dockerd's data root
# (images and build cache), so that a re-run rebuilds only what changed. `rm -rf` it to reclaim
# the ~13 GB.
set -euo pipefail
cd "$(dirname "$0")/.."

IDIFF_CI_CACHE=${IDIFF_CI_CACHE:-/var/cache/idiff-ci}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
: "${IDIFF_TEST_IMAGE:?set IDIFF_TEST_IMAGE to the tag to build}"
[[ ${DOCKER_HOST:-} == unix://* ]] || { echo "set DOCKER_HOST to unix://DIR/docker.sock" >&2; exit 2; }
RUN_DIR=$(dirname "${DOCKER_HOST#unix://}")
PIDFILE="$RUN_DIR/dockerd.pid"
export DOCKER_BUILDKIT=0  # Debian's docker.io has no buildx: the classic builder

log() { echo "docker: $*" >&2; }

start() {
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
  fi
  mkdir -p "$IDIFF_CI_CACHE/docker" "$RUN_DIR"
  # setsid: the daemon outlives this script, and a Ctrl-C in the caller's terminal does not reach it
  setsid /usr/sbin/dockerd --host "$DOCKER_HOST" --data-root "$IDIFF_CI_CACHE/docker" \
    --exec-root "$RUN_DIR/exec" --pidfile "$PIDFILE" --storage-driver overlay2 \
    --bridge none --iptables=false --ip-forward=false --ip-masq=false \
    >"$IDIFF_CI_CACHE/dockerd.log" 2>&1 </dev/null &
  local pid=$! _
  for _ in $(seq 60); do
    if docker version >/dev/null 2>&1; then
      log "dockerd $pid up at $DOCKER_HOST"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  log "dockerd did not start; its log:"
  tail -n 30 "$IDIFF_CI_CACHE/dockerd.log" >&2
  return 1
}

stop() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || pid=""
  # the pid file of a daemon that died may name an unrelated process by now
  if [[ -n $pid && $(readlink "/proc/$pid/exe" 2>/dev/null) == */dockerd ]]; then
    kill -TERM "$pid"  # stops its containers and its containerd, then exits
    local _
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "dockerd $pid still running after 60 s; killing it"
      kill -KILL "$pid"
    fi
  fi
  # dockerd leaves its network namespace mounted under the exec root
  local mount
  for mount in $(awk -v dir="$RUN_DIR/" 'index($2, dir) == 1 {print $2}' /proc/mounts | sort -r); do
    umount "$mount"
  done
  rm -rf "$RUN_DIR"
}

# A minbase Debian 12 with Python 3 and a virtualenv first on PATH (bookworm's pip refuses to install
# into /usr, PEP 668), imported as an image named in BASE_IMAGE.
BASE_IMAGE=""
make_base_image() {
  local rootfs="$IDIFF_CI_CACHE/rootfs-bookworm"
  if [[ ! -e $rootfs/.complete ]]; then
    rm -rf "$rootfs"
    log "debootstrap bookworm (about 3 minutes; kept in $rootfs)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$rootfs" "$DEBIAN_MIRROR" >"$IDIFF_CI_CACHE/debootstrap.log" 2>&1 \
      || { tail -n 30 "$IDIFF_CI_CACHE/debootstrap.log" >&2; return 1; }
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
      "$DEBIAN_MIRROR" "$DEBIAN_MIRROR" "$DEBIAN_MIRROR" >"$rootfs/etc/apt/sources.list"
    chroot "$rootfs" python3 -m venv /opt/venv
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
    touch "$rootfs/.complete"
  fi
  # Where outbound TLS goes through an intercepting proxy, the host trusts its CA among the local
  # extra CAs; pip and apt inside the build need it too. Elsewhere there are none, and none are added.
  local cas=(/usr/local/share/ca-certificates/*.crt) key="no-extra-ca"
  rm -f "$rootfs"/usr/local/share/ca-certificates/*.crt
  if [[ -e ${cas[0]} ]]; then
    cp "${cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
    key=$(cat "${cas[@]}" | sha256sum | cut -c1-12)
  fi
  chroot "$rootfs" update-ca-certificates --fresh >/dev/null 2>&1  # its rehash warns about the bundle
  # Named by the CAs it holds: an unchanged base keeps its image id, and with it the build cache.
  BASE_IMAGE="idiff-ci/debian-python:bookworm-$key"
  if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    tar -C "$rootfs" --exclude=./.complete -c . | docker import \
      --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  fi
}

build() {
  local start=$SECONDS
  make_base_image
  log "base image $BASE_IMAGE ready after $((SECONDS - start)) s; building $IDIFF_TEST_IMAGE"
  local build_start=$SECONDS build_log="$IDIFF_CI_CACHE/build.log"
  if ! docker build --network host -f docker/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
      -t "$IDIFF_TEST_IMAGE" . >"$build_log" 2>&1; then
    tail -n 40 "$build_log" >&2
    return 1
  fi
  log "built $IDIFF_TEST_IMAGE in $((SECONDS - build_start)) s," \
    "$(docker image inspect -f '{{.Size}}' "$IDIFF_TEST_IMAGE" | numfmt --to=si)B"
}

case "${1:-}" in
  start | build | stop) "$1" ;;
  *) echo "usage: $0 start|build|stop" >&2; exit 2 ;;
esac
