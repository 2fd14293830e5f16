#!/usr/bin/env bash
# Builds the real-client-tier guest: the kernel image of Debian's 6.12 package, and a
# busybox initramfs with the modules a virtio-net NIC and the 9p shares need, whose
# /init is tests/vm/guest/init. Nothing is compiled and nothing is installed on the
# host: the .deb is unpacked with dpkg-deb into a temporary folder.
#
#   build.sh OUT_DIR DEB_CACHE_DIR KVER KPKGVER
#
# Writes OUT_DIR/{vmlinuz,initramfs.cpio.gz,kver}, and OUT_DIR/vmlinux (the kernel
# uncompressed, bootable through its PVH entry point) when it can. DEB_CACHE_DIR keeps the downloaded
# linux-image .deb between builds (tests/vm/run points it at the kernel tier's cache).
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 OUT_DIR DEB_CACHE_DIR KVER KPKGVER" >&2; exit 2; }
OUT="$1" DEBS="$2" KVER="$3" KPKGVER="$4"
HERE="$(cd "$(dirname "$0")" && pwd)"
log() { echo "[vm-tier build] $*" >&2; }
mkdir -p "$OUT" "$DEBS"

IMGPKG="linux-image-$KVER"
debver="${KPKGVER//:/%3a}"
deb() { compgen -G "$DEBS/${IMGPKG}_${debver}_*.deb" | head -n1; }
if [ -z "$(deb || true)" ]; then
  log "apt-get download $IMGPKG=$KPKGVER"
  sandbox=()   # as root, apt cannot drop to _apt in a root-owned folder: don't try
  [ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
  (cd "$DEBS" && apt-get download -q "${sandbox[@]}" "$IMGPKG=$KPKGVER")
fi
DEB="$(deb)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/svq-vm-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# 9p (the host's / and the run folder) and virtio_net with what it depends on.
# virtio_pci and AF_PACKET are built into Debian's kernel.
KMODS=(fs/netfs/netfs net/9p/9pnet net/9p/9pnet_virtio fs/9p/9p
       net/core/failover drivers/net/net_failover drivers/net/virtio_net)
members=("./boot/vmlinuz-$KVER")
for m in "${KMODS[@]}"; do members+=("./lib/modules/$KVER/kernel/$m.ko.xz"); done
log "extracting the kernel image and ${#KMODS[@]} modules from $(basename "$DEB")"
dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$WORK" "${members[@]}"

log "building the initramfs"
R="$WORK/root"
MD="$R/lib/modules/$KVER"
mkdir -p "$R"/{bin,dev,proc,sys,host,tmp} "$MD/kernel"
cp "$(command -v busybox)" "$R/bin/busybox"
if ! { ldd "$R/bin/busybox" 2>&1 || true; } | grep -q 'not a dynamic'; then
  log "busybox is not static (install busybox-static)"; exit 1
fi
for m in "${KMODS[@]}"; do
  xz -dc "$WORK/lib/modules/$KVER/kernel/$m.ko.xz" > "$MD/kernel/$(basename "$m").ko"
done
busybox depmod -b "$R" "$KVER"
install -m 0755 "$HERE/init" "$R/init"

# The uncompressed kernel boots 1.5-2.5 s faster under TCG: there is no decompression
# in emulated code, and qemu starts an ELF kernel at its PVH entry point (Xen note
# PHYS32_ENTRY, type 0x12). Debian's bzImage holds it zstd-compressed. Whatever goes
# wrong here only means booting the bzImage instead.
rm -f "$OUT/vmlinux"
python3 - "$WORK/boot/vmlinuz-$KVER" "$OUT/vmlinux.tmp" <<'PY' && mv "$OUT/vmlinux.tmp" "$OUT/vmlinux" || log "no PVH vmlinux (booting the bzImage)"
import struct, subprocess, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\x28\xb5\x2f\xfd")  # zstd frame magic
if start < 0:
    sys.exit("no zstd payload in the bzImage")
# zstd stops at the end of the frame and complains about the trailer: ignore its status.
elf = subprocess.run(["zstd", "-dcq"], input=data[start:], capture_output=True).stdout
if elf[:4] != b"\x7fELF" or elf[4] != 2:
    sys.exit("the payload is not a 64-bit ELF")
shoff, = struct.unpack_from("<Q", elf, 0x28)
shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
found = False
for i in range(shnum):
    sh_type, = struct.unpack_from("<I", elf, shoff + i * shentsize + 4)
    off, size = struct.unpack_from("<QQ", elf, shoff + i * shentsize + 0x18)
    if sh_type != 7:  # SHT_NOTE
        continue
    pos = off
    while pos + 12 <= off + size:
        namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
        name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
        found |= name == b"Xen" and ntype == 0x12
        pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
if not found:
    sys.exit("no PVH entry point (Xen note 0x12) in vmlinux")
open(sys.argv[2], "wb").write(elf)
PY

# Temporary names, renamed at the end: an interrupted build leaves no usable entry.
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/initramfs.cpio.gz.tmp"
cp "$WORK/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
echo "$KVER" > "$OUT/kver"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
log "done: $OUT ($(du -k "$OUT/initramfs.cpio.gz" | cut -f1) KiB initramfs$([ -f "$OUT/vmlinux" ] && echo ", PVH vmlinux"))"
