#!/bin/sh
# Runs INSIDE the kernel-tier guest, as root, cwd = the repository (read-only).
#   entry.sh pytest [pytest args...]   run the kernel tests with the WORKDIR venv
#   entry.sh shell 'CMD'               run CMD with sh (debugging)
#   entry.sh exec PROGRAM [ARGS...]    run PROGRAM (e.g. a cargo test binary)
# Creates the simulator devices first and exports their names:
#   SVQ_KERNEL_NET=vdpa0 (vdpasim_net, mac 52:54:00:12:34:56, mtu 1400)
#   SVQ_KERNEL_BLK=vdpa1 (vdpasim_blk)
#   SVQ_KERNEL_NET_B=vdpa2 (vdpasim_net like vdpa0), SVQ_KERNEL_BLK_B=vdpa3 (vdpasim_blk):
#   the destinations of migration tests. vdpa_sim_blk must be loaded with
#   shared_backend=1 (tests/kernel/run puts it on the kernel command line): vdpa1 and vdpa3
#   then share one RAM disk, as a migration's source and destination hosts share storage.
# Results (JSON) go to SVQ_KERNEL_RESULTS (a file) and SVQ_KERNEL_RESULTS_DIR.
set -eu
W="${SVQ_KERNEL_WORKDIR:?}"
mode="$1"; shift
t0="$(cut -d' ' -f1 /proc/uptime)"

shared="$(cat /sys/module/vdpa_sim_blk/parameters/shared_backend 2>/dev/null || echo missing)"
[ "$shared" = Y ] || {
  echo "kernel tier: vdpa_sim_blk shared_backend is '$shared', not Y (load it with shared_backend=1)" >&2
  exit 97
}
vdpa dev add mgmtdev vdpasim_net name vdpa0 mac 52:54:00:12:34:56 mtu 1400
vdpa dev add mgmtdev vdpasim_blk name vdpa1
vdpa dev add mgmtdev vdpasim_net name vdpa2 mac 52:54:00:12:34:56 mtu 1400
vdpa dev add mgmtdev vdpasim_blk name vdpa3
for d in vdpa0 vdpa1 vdpa2 vdpa3; do
  drv="$(basename "$(readlink "/sys/bus/vdpa/devices/$d/driver")")"
  [ "$drv" = vhost_vdpa ] || { echo "kernel tier: $d is bound to '$drv', not vhost_vdpa" >&2; exit 97; }
  echo "kernel tier: $d -> /dev/$(basename /sys/bus/vdpa/devices/$d/vhost-vdpa-*)"
done
export SVQ_KERNEL_NET=vdpa0 SVQ_KERNEL_BLK=vdpa1 SVQ_KERNEL_NET_B=vdpa2 SVQ_KERNEL_BLK_B=vdpa3
export SVQ_KERNEL_RESULTS="$W/results.json" SVQ_KERNEL_RESULTS_DIR="$W/results"
mkdir -p "$SVQ_KERNEL_RESULTS_DIR"
[ -x "$W/venv/bin/python" ] && export PATH="$W/venv/bin:$PATH" VIRTUAL_ENV="$W/venv"

set +e
case "$mode" in
  pytest) "$W/venv/bin/python" -m pytest tests/kernel -m kernel -v -p no:cacheprovider "$@" ;;
  shell) /bin/sh -c "$1" ;;
  exec) "$@" ;;
  *) echo "entry.sh: unknown mode $mode" >&2; false ;;
esac
rc=$?
t1="$(cut -d' ' -f1 /proc/uptime)"
echo "$t0 $t1" > "$W/.vm/guest-times"
exit "$rc"
