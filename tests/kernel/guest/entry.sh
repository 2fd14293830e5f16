#!/bin/sh
# Runs INSIDE the kernel-tier guest, as root, cwd = the repository (read-only).
#   entry.sh pytest [pytest args...]   run the kernel tests with the WORKDIR venv
#   entry.sh shell 'CMD'               run CMD with sh (debugging)
#   entry.sh exec PROGRAM [ARGS...]    run PROGRAM (e.g. a cargo test binary)
# Creates the simulator devices first and exports their names:
#   SVQ_KERNEL_NET=vdpa0 (vdpasim_net, mac 52:54:00:12:34:56, mtu 1400)
#   SVQ_KERNEL_BLK=vdpa1 (vdpasim_blk)
set -eu
W="${SVQ_KERNEL_WORKDIR:?}"
mode="$1"; shift
t0="$(cut -d' ' -f1 /proc/uptime)"

vdpa dev add mgmtdev vdpasim_net name vdpa0 mac 52:54:00:12:34:56 mtu 1400
vdpa dev add mgmtdev vdpasim_blk name vdpa1
for d in vdpa0 vdpa1; do
  drv="$(basename "$(readlink "/sys/bus/vdpa/devices/$d/driver")")"
  [ "$drv" = vhost_vdpa ] || { echo "kernel tier: $d is bound to '$drv', not vhost_vdpa" >&2; exit 97; }
  echo "kernel tier: $d -> /dev/$(basename /sys/bus/vdpa/devices/$d/vhost-vdpa-*)"
done
export SVQ_KERNEL_NET=vdpa0 SVQ_KERNEL_BLK=vdpa1 SVQ_KERNEL_RESULTS="$W/results.json"
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
