#!/usr/bin/env bash
# Build Herald's image offline, from local parts, with the repository's Dockerfile: the
# binary built on this machine and the shared libraries it links (what `ldd` lists), in an
# image from scratch. No registry is contacted.
#
#   hack/build-image.sh [--binary PATH] [--tag TAG] [--archive FILE]
#
#   --binary   the herald binary to package (default: `cargo build --release --locked`,
#              then target/release/herald)
#   --tag      the image name (default: localhost/herald:dev)
#   --archive  also write the image as a docker-archive (for `ctr images import`,
#              `podman load`, `docker load`)
#
# Uses buildah with the vfs storage driver (works as root without overlay support; the
# image stays in buildah's storage, /var/lib/containers/storage, between runs). Prints the
# tag on its last line of stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

binary="" tag="localhost/herald:dev" archive=""
while (($#)); do
  case $1 in
    --binary) binary=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --archive) archive=$2; shift 2 ;;
    *) echo "build-image: unknown argument $1 (see the comment at the top of $0)" >&2; exit 2 ;;
  esac
done

log() { echo "build-image: $*" >&2; }
command -v buildah >/dev/null || { log "buildah not found (Debian: apt-get install -y buildah)"; exit 1; }

if [[ -z $binary ]]; then
  log "building the release binary"
  cargo build --release --locked --bin herald >&2
  binary=target/release/herald
fi
[[ -x $binary ]] || { log "$binary is not an executable"; exit 1; }

# One build at a time on this machine: the cleanup below tells its own leftovers by what appeared
# during the build, and a tag pushed to an archive must still be the image this build made.
exec 9>"${TMPDIR:-/tmp}/herald-build-image.lock"
flock 9

ctx=$(mktemp -d -t herald-image-XXXXXX)
trap 'rm -rf "$ctx"' EXIT
cp "$binary" "$ctx/herald"
# Debug information is no use in the image (a test build's binary is mostly that).
if command -v strip >/dev/null; then strip --strip-debug "$ctx/herald"; fi
mkdir -p "$ctx/rootfs"
# Every library the dynamic loader resolves, and the loader itself, at the path the binary
# names (ldd prints "name => /path (addr)" or "/path (addr)").
libs=$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
[[ -n $libs ]] || { log "ldd lists no libraries for $binary"; exit 1; }
for lib in $libs; do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
log "libraries: $(tr '\n' ' ' <<<"$libs")"

# What the build leaves behind: buildah 1.28 keeps a working container for each stage that
# `COPY --from` reads, the stages' images stay as unnamed images (each holding a copy of the
# binary), and the image this tag named before becomes unnamed. All of it is removed after the
# build so that repeated builds do not fill the disk (vfs keeps a full copy of every layer);
# containers and images that existed before are left alone.
leftovers() {
  buildah --storage-driver vfs containers --quiet 2>/dev/null | sort -u
  buildah --storage-driver vfs images --noheading --quiet --filter dangling=true 2>/dev/null | sort -u
}
before=$(leftovers)
buildah --storage-driver vfs bud --quiet \
  --build-arg BINARY_FROM=prebuilt --build-arg RUNTIME_IMAGE=local-runtime \
  -f Dockerfile -t "$tag" "$ctx" >&2
for id in $(comm -13 <(sort -u <<<"$before") <(leftovers | sort -u)); do
  buildah --storage-driver vfs rm "$id" >/dev/null 2>&1 || buildah --storage-driver vfs rmi "$id" >/dev/null 2>&1 || true
done
# Images freed by removing those containers.
for id in $(comm -13 <(sort -u <<<"$before") <(leftovers | sort -u)); do
  buildah --storage-driver vfs rmi "$id" >/dev/null 2>&1 || true
done

if [[ -n $archive ]]; then
  rm -f "$archive.tmp"
  buildah --storage-driver vfs push --quiet "$tag" "docker-archive:$archive.tmp:$tag" >&2
  mv "$archive.tmp" "$archive"
  log "wrote $archive"
fi
echo "$tag"
