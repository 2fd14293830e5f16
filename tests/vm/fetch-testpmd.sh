#!/usr/bin/env bash
# Unpacks DPDK's dpdk-testpmd and the vhost PMD from Debian packages, without installing
# anything: `apt-get download` the packages that hold testpmd (dpdk-dev), the librte_*
# libraries it links against, the two drivers it loads at run time (net_vhost and the
# ring mempool) and whatever apt would newly install for them, then `dpkg-deb -x` them
# all into OUT_DIR. (`apt-get install dpdk-dev` would pull in about 200 packages and
# upgrade systemd/udev through rdma-core.)
#
#   fetch-testpmd.sh OUT_DIR DEB_CACHE_DIR
#
# Writes OUT_DIR/bin/testpmd, a wrapper that sets LD_LIBRARY_PATH and LD_PRELOAD and
# runs OUT_DIR/usr/bin/dpdk-testpmd with its arguments. The EAL refuses `-d PLUGIN`
# below a world-writable folder, so the two drivers are preloaded instead (their
# constructors register them).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 OUT_DIR DEB_CACHE_DIR" >&2; exit 2; }
OUT="$1" DEBS="$2"
log() { echo "[vm-tier testpmd] $*" >&2; }
mkdir -p "$DEBS"
sandbox=()   # as root, apt cannot drop to _apt in a root-owned folder: don't try
[ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
cached() { compgen -G "$DEBS/${1}_*.deb" | head -n1; }
download() {
  local want=() p
  for p in "$@"; do [ -n "$(cached "$p" || true)" ] || want+=("$p"); done
  [ ${#want[@]} -eq 0 ] && return 0
  log "apt-get download ${#want[@]} packages"
  (cd "$DEBS" && apt-get download -q "${sandbox[@]}" "${want[@]}")
}

download dpdk-dev
T="$(mktemp -d "${TMPDIR:-/tmp}/svq-vm-testpmd.XXXXXX")"
trap 'rm -rf "$T" "$OUT.tmp"' EXIT
dpkg-deb --fsys-tarfile "$(cached dpdk-dev)" | tar -x -C "$T" ./usr/bin/dpdk-testpmd

# librte_net_vhost.so.23 -> librte-net-vhost23; names ending in a digit get a dash
# (librte_net_i40e.so.23 -> librte-net-i40e-23).
pkgname() {
  local base="${1%%.so.*}" abi="${1##*.so.}" n
  n="${base//_/-}"
  case "$n" in *[0-9]) echo "$n-$abi" ;; *) echo "$n$abi" ;; esac
}
mapfile -t needed < <(objdump -p "$T/usr/bin/dpdk-testpmd" | awk '$1 == "NEEDED" && $2 ~ /^librte_/ {print $2}')
[ ${#needed[@]} -gt 0 ] || { log "dpdk-testpmd links no librte_* library?"; exit 1; }
abi="${needed[0]##*.so.}"
pkgs=("$(pkgname "librte_net_vhost.so.$abi")" "$(pkgname "librte_mempool_ring.so.$abi")")
for l in "${needed[@]}"; do pkgs+=("$(pkgname "$l")"); done
# What apt would newly install for them ("Inst name (version ...)"; upgrades have
# "[old]" there), without the daemons that only come along as dependencies of
# libraries we load without their hardware.
mapfile -t closure < <(apt-get install -s --no-install-recommends "${pkgs[@]}" 2>/dev/null |
  awk '$1 == "Inst" && $3 !~ /^\[/ {print $2}' | grep -vxE 'udev|rdma-core|systemd.*|dbus.*' || true)
[ ${#closure[@]} -gt 0 ] || { log "apt-get install -s ${pkgs[*]} resolved nothing"; exit 1; }
download "${closure[@]}"

log "unpacking $((${#closure[@]} + 1)) packages into $OUT"
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp/bin"
for p in dpdk-dev "${closure[@]}"; do dpkg-deb -x "$(cached "$p")" "$OUT.tmp"; done
LIB="$(dirname "$(compgen -G "$OUT.tmp/usr/lib/*/librte_eal.so.$abi" | head -n1)")"
LIB="${LIB#"$OUT.tmp"}"
# Every folder with a shared library in it (usr/lib/TRIPLET, lib/TRIPLET for libnl,
# usr/lib/TRIPLET/libibverbs), relative to OUT_DIR.
libdirs="$(cd "$OUT.tmp" && find . -name '*.so*' \( -type f -o -type l \) -printf '%h\n' |
           sed 's#^\.##' | sort -u)"
ldpath=() ldpath_here=()
for d in $libdirs; do ldpath+=("\$R$d"); ldpath_here+=("$OUT$d"); done
cat > "$OUT.tmp/bin/testpmd" <<WRAPPER
#!/bin/sh
# dpdk-testpmd unpacked from Debian packages (tests/vm/fetch-testpmd.sh)
R='$OUT'
L="\$R$LIB"
export LD_LIBRARY_PATH="$(IFS=:; echo "${ldpath[*]}")\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export LD_PRELOAD="\$L/librte_mempool_ring.so.$abi:\$L/librte_net_vhost.so.$abi\${LD_PRELOAD:+:\$LD_PRELOAD}"
exec "\$R/usr/bin/dpdk-testpmd" "\$@"
WRAPPER
chmod +x "$OUT.tmp/bin/testpmd"
dpkg-deb -f "$(cached dpdk-dev)" Version > "$OUT.tmp/version"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
missing="$(LD_LIBRARY_PATH="$(IFS=:; echo "${ldpath_here[*]}")" ldd "$OUT/usr/bin/dpdk-testpmd" | grep 'not found' || true)"
if [ -n "$missing" ]; then
  log "unresolved libraries:"; echo "$missing" >&2; rm -rf "$OUT"; exit 1
fi
log "done: $OUT (DPDK $(cat "$OUT/version"), $(du -sh "$OUT" | cut -f1))"
