#!/usr/bin/env bash
# `make test-images`, part 1: what the image tests need on this kind of machine (no registry, no systemd,
# crun unusable; ../shared/docs/environment.md from the repository root, "Containers"), made once and cached:
#   - podman, runc, debootstrap (apt) and podman-compose (PyPI, in its own venv under build/);
#   - a Debian bookworm base from the Debian mirror (debootstrap + podman import);
#   - stand-ins for the base images docker/ and docker-compose.yml name: Python (tagged with the Dockerfiles'
#     FROM name), Redis and an S3 server; rebuilt only when their recipe changes;
#   - a local package index holding the CPU torch wheel of this machine and its dependencies, for the worker
#     image's TORCH_CPU_INDEX build argument (download.pytorch.org is not reachable here).
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=tests/deploy/images
VENV=${VENV:-.venv}
CACHE=build/images
PYTHON=${PYTHON:-python3.11}
export CONTAINERS_CONF=$PWD/$HERE/containers.conf
mkdir -p "$CACHE"

step() { printf '[prepare %4ds] %s\n' "$SECONDS" "$*"; }

need=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  step "apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

COMPOSE_VENV=$CACHE/podman-compose
if ! "$COMPOSE_VENV/bin/podman-compose" version >/dev/null 2>&1; then
  step "podman-compose 1.6.0 into $COMPOSE_VENV"
  "$PYTHON" -m venv "$COMPOSE_VENV"
  "$COMPOSE_VENV/bin/pip" install -q "podman-compose==1.6.0"
fi

image_exists() { podman image exists "$1"; }

# Debian base: the same mirror apt uses on this machine.
MIRROR=$(grep -hm1 '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' || true)
[ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
if ! image_exists localhost/bora-ci/debian:bookworm; then
  step "debootstrap bookworm from $MIRROR"
  rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
  tar --numeric-owner -C "$rootfs" -c . | podman import --change 'CMD ["bash"]' - localhost/bora-ci/debian:bookworm >/dev/null
  rm -rf "$rootfs"
fi

# Stand-ins, tagged by a hash of their recipe (and of the CA they carry) so a change rebuilds them.
context=$CACHE/standin-context
rm -rf "$context" && mkdir -p "$context/ca" && cp /usr/local/share/ca-certificates/*.crt "$context/ca/" 2>/dev/null || true
# The stand-in's Python: this machine's CPython 3.11 (stdlib and shared library; no site-packages or tests).
PY_PREFIX=$("$PYTHON" -c 'import sys; print(sys.base_prefix)')
PY_VERSION=$("$PYTHON" -c 'import platform; print(platform.python_version())')
tar -C "$PY_PREFIX" --exclude='lib/python3.11/site-packages/*' --exclude=lib/python3.11/test \
  --exclude=lib/python3.11/idlelib --exclude=lib/python3.11/tkinter --exclude='__pycache__' \
  --exclude='lib/python3.11/config-3.11-*/*.a' \
  -cf "$context/python.tar" bin/python3.11 lib/python3.11 lib/libpython3.11.so.1.0 include/python3.11
MOTO_VERSION=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))')
standin() {  # standin NAME CONTAINERFILE TAG... -- builds localhost/bora-ci/NAME:<hash> unless present
  local name=$1 file=$2; shift 2
  local key
  key=$(cat "$HERE"/*.Containerfile "$context"/ca/* <(echo "$MOTO_VERSION $PY_PREFIX $PY_VERSION") | sha256sum | cut -c1-12)
  if ! image_exists "localhost/bora-ci/$name:$key"; then
    step "build stand-in $name ($file)"
    podman build -q --pull=never --format docker --network=host -f "$HERE/$file" --build-arg "MOTO_VERSION=$MOTO_VERSION" \
      -t "localhost/bora-ci/$name:$key" "$context" >/dev/null
  fi
  for tag in "$@"; do podman tag "localhost/bora-ci/$name:$key" "$tag"; done
  # Older builds of this stand-in (another recipe) go: one set of stand-ins on disk.
  podman images --format '{{.Repository}}:{{.Tag}}' | grep "^localhost/bora-ci/$name:" \
    | grep -v -e ":$key\$" -e ':current$' | xargs -r podman rmi >/dev/null || true
}
standin python debian-python.Containerfile docker.io/library/python:3.11.13-slim-bookworm
standin redis redis.Containerfile localhost/bora-ci/redis:current
standin s3 s3.Containerfile localhost/bora-ci/s3:current

# The torch wheel (the pinned CPU build on this machine's disk) and its dependencies as a PEP 503 index.
TORCH=$("$VENV/bin/python" -c 'import tomllib; d=tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"]; print([x for x in d if x.startswith("torch")][0])')
INDEX=$CACHE/torch-index
if [ ! -f "$INDEX/.done-$TORCH" ]; then
  step "local index for $TORCH (CPU wheel) and its dependencies"
  rm -rf "$INDEX" && mkdir -p "$INDEX/files"
  "$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.11 -d "$INDEX/files" "$TORCH"
  ls "$INDEX"/files/torch-*+cpu-*.whl >/dev/null || { echo "no CPU torch wheel among: $(ls "$INDEX/files")" >&2; exit 1; }
  "$PYTHON" "$HERE/make_index.py" "$INDEX"
  touch "$INDEX/.done-$TORCH"
fi
step "ready: $(podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -c bora-ci) stand-in tags"
