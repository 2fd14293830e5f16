#!/usr/bin/env bash
# Builds the kernel-tier guest: a Debian 6.12 kernel image, the vDPA simulator modules
# (vringh, vdpa_sim, vdpa_sim_net, vdpa_sim_blk) built out of tree from Debian's
# linux-source-6.12 against the matching linux-headers, and a busybox initramfs whose
# /init is tests/kernel/guest/init.
#
#   build.sh OUT_DIR DEB_CACHE_DIR KVER KPKGVER
#
# Writes OUT_DIR/{vmlinuz,initramfs.cpio.gz,kver}. Debian packages are downloaded with
# `apt-get download` into DEB_CACHE_DIR (kept between builds) and unpacked with dpkg-deb
# into a temporary folder: nothing is installed into the host's /boot or /lib/modules.
# No kernel source ends up in the repository: it is read from the linux-source .deb.
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 OUT_DIR DEB_CACHE_DIR KVER KPKGVER" >&2; exit 2; }
OUT="$1" DEBS="$2" KVER="$3" KPKGVER="$4"
HERE="$(cd "$(dirname "$0")" && pwd)"
log() { echo "[kernel-tier build] $*" >&2; }

KSERIES="${KVER%%+*}"                 # 6.12.117
KBASE="${KVER%-amd64}"                # 6.12.117+deb12
SRCPKG="linux-source-${KSERIES%.*}"   # linux-source-6.12
mkdir -p "$OUT" "$DEBS"

pkgs=("linux-image-$KVER" "linux-headers-$KVER" "linux-headers-$KBASE-common"
      "linux-kbuild-$KBASE" "$SRCPKG")
debver="${KPKGVER//:/%3a}"
dl=()
for p in "${pkgs[@]}"; do
  compgen -G "$DEBS/${p}_${debver}_*.deb" >/dev/null || dl+=("$p=$KPKGVER")
done
if [ ${#dl[@]} -gt 0 ]; then
  log "apt-get download ${dl[*]}"
  sandbox=()   # as root, apt cannot drop to _apt in a root-owned cache: don't try
  [ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
  (cd "$DEBS" && apt-get download -q "${sandbox[@]}" "${dl[@]}")
fi
deb() { compgen -G "$DEBS/${1}_${debver}_*.deb" | head -n1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/svq-kernel-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Modules of the Debian kernel that go into the initramfs. virtio_vdpa is not among
# them, so new vdpa devices bind to vhost_vdpa.
KMODS=(fs/netfs/netfs net/9p/9pnet net/9p/9pnet_virtio fs/9p/9p
       virt/lib/irqbypass drivers/vhost/vhost_iotlb drivers/vhost/vhost
       drivers/vdpa/vdpa drivers/vhost/vhost_vdpa)
log "extracting the kernel image and modules"
mkdir -p "$WORK/img"
members=("./boot/vmlinuz-$KVER")
for m in "${KMODS[@]}"; do members+=("./lib/modules/$KVER/kernel/$m.ko.xz"); done
dpkg-deb --fsys-tarfile "$(deb "linux-image-$KVER")" | tar -x -C "$WORK/img" "${members[@]}"

log "extracting headers and kbuild"
H="$WORK/hdr"
mkdir -p "$H"
for p in "linux-headers-$KVER" "linux-headers-$KBASE-common" "linux-kbuild-$KBASE"; do
  dpkg-deb -x "$(deb "$p")" "$H"
done
KDIR="$H/usr/src/linux-headers-$KVER"
sed -i "s#include /usr/src/#include $H/usr/src/#" "$KDIR/Makefile"

log "extracting vdpa_sim and vringh sources from $SRCPKG"
M="$WORK/mod"
mkdir -p "$M"
dpkg-deb --fsys-tarfile "$(deb "$SRCPKG")" |
  tar -xO "./usr/src/$SRCPKG.tar.xz" |
  tar -xJ -C "$WORK" "$SRCPKG/drivers/vdpa/vdpa_sim" "$SRCPKG/drivers/vhost/vringh.c"
cp "$WORK/$SRCPKG"/drivers/vdpa/vdpa_sim/*.[ch] "$WORK/$SRCPKG/drivers/vhost/vringh.c" "$M/"
echo 'obj-m += vringh.o vdpa_sim.o vdpa_sim_net.o vdpa_sim_blk.o' > "$M/Kbuild"

log "building vringh.ko vdpa_sim.ko vdpa_sim_net.ko vdpa_sim_blk.ko"
# CONFIG_DEBUG_INFO_BTF_MODULES= skips BTF generation (it would need pahole).
make -s -C "$KDIR" M="$M" CONFIG_DEBUG_INFO_BTF_MODULES= -j"$(nproc)" modules

log "building the initramfs"
R="$WORK/root"
MD="$R/lib/modules/$KVER"
mkdir -p "$R"/{bin,dev,proc,sys,host,tmp} "$MD/kernel" "$MD/extra"
cp "$(command -v busybox)" "$R/bin/busybox"
if ! { ldd "$R/bin/busybox" 2>&1 || true; } | grep -q 'not a dynamic'; then
  log "busybox is not static (install busybox-static)"; exit 1
fi
K="$WORK/img/lib/modules/$KVER/kernel"
for m in "${KMODS[@]}"; do xz -dc "$K/$m.ko.xz" > "$MD/kernel/$(basename "$m").ko"; done
cp "$M"/*.ko "$MD/extra/"
strip --strip-debug "$MD"/extra/*.ko
busybox depmod -b "$R" "$KVER"
install -m 0755 "$HERE/init" "$R/init"

# Write into a temporary name and rename, so an interrupted build leaves no half entry.
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/initramfs.cpio.gz.tmp"
cp "$WORK/img/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
echo "$KVER" > "$OUT/kver"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
log "done: $OUT"
