#!/usr/bin/env bash
# Builds the live-migration guest's initramfs: the tier's initramfs (busybox, kernel
# modules) with a second cpio archive appended that holds /mig-init (guest/mig-init) and
# /bin/migtraffic, compiled here from guest/migtraffic.c with the host's gcc (static, so
# it runs on the initramfs's own). The kernel unpacks concatenated archives in order.
#
#   build-mig.sh OUT_DIR BASE_INITRAMFS
#
# Writes OUT_DIR/{initramfs-mig.cpio.gz,migtraffic}. Nothing compiled is kept anywhere
# else (tests/vm/run puts OUT_DIR in its cache, keyed by the hash of these three files).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 OUT_DIR BASE_INITRAMFS" >&2; exit 2; }
OUT="$1" BASE="$2"
HERE="$(cd "$(dirname "$0")" && pwd)"
log() { echo "[vm-tier build-mig] $*" >&2; }
[ -f "$BASE" ] || { log "no base initramfs at $BASE"; exit 1; }
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/svq-vm-mig.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$WORK/root/bin"
log "gcc -static migtraffic.c"
gcc -static -Os -s -std=gnu11 -Wall -Wextra -Werror -o "$WORK/root/bin/migtraffic" "$HERE/migtraffic.c"
install -m 0755 "$HERE/mig-init" "$WORK/root/mig-init"
(cd "$WORK/root" && printf '%s\n' bin/migtraffic mig-init | cpio -o -H newc --quiet | gzip -1) > "$WORK/mig.cpio.gz"
cat "$BASE" "$WORK/mig.cpio.gz" > "$OUT/initramfs-mig.cpio.gz.tmp"
cp "$WORK/root/bin/migtraffic" "$OUT/migtraffic"
mv "$OUT/initramfs-mig.cpio.gz.tmp" "$OUT/initramfs-mig.cpio.gz"
log "done: $OUT ($(du -k "$OUT/initramfs-mig.cpio.gz" | cut -f1) KiB initramfs)"
