#!/bin/sh
# /init of the client-restart guest (busybox sh), built into the initramfs by guest.py.
# It runs the swap unit's ExecStart (remem-swap attach), the hog, then the unit's ExecStop
# (remem-swap detach), as systemd would on a client host. Parameters come from the kernel
# command line (remem.*=...); lines starting with REMEMVM are read by the host.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /run /tmp /etc/remem

finish() {
  echo "REMEMVM-RESULT: $*"
  sync
  poweroff -f
  sleep 10
}
param() {
  for w in $(cat /proc/cmdline); do
    case $w in "$1="*) echo "${w#*=}" ;; esac
  done
}
# Runs the command in file $1, one argument per line (a unit's Exec line, parsed by the host).
run_command() {
  set -f
  IFS='
'
  # shellcheck disable=SC2046
  set -- $(cat "$1")
  unset IFS
  set +f
  echo "REMEMVM exec $*"
  "$@"
}

echo "REMEMVM init uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /lib/modules/load.order); do
  insmod "/lib/modules/$m" || finish FAIL "insmod $m"
done
HOG=$(param remem.hog)
param remem.env64 | base64 -d > /etc/remem/swap.env
param remem.start64 | base64 -d > /tmp/exec-start
param remem.stop64 | base64 -d > /tmp/exec-stop
# The unit's EnvironmentFile: KEY=VALUE lines, no quoting (the host writes them so).
while IFS= read -r kv; do
  [ -n "$kv" ] && export "${kv?}"
done < /etc/remem/swap.env

i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ip link set lo up
ip link set eth0 up || finish FAIL "no eth0"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

# Swapping over TCP sends every page-out through the network stack, whose buffers then come
# from the kernel's emergency reserves (GFP_NOIO|__GFP_MEMALLOC); a 128 MiB guest's default
# (~1.4 MB) ran dry under the hog and stalled the swap device in page allocation failures.
# Hosts that swap over the network raise it the same way.
echo 8192 > /proc/sys/vm/min_free_kbytes
run_command /tmp/exec-start || finish FAIL "ExecStart rc=$?"
# nbd's messages (a lost connection, a stuck request) on the console from here on.
dmesg -n 7
echo "REMEMVM swap-on $(grep -c '^/dev/nbd' /proc/swaps) device(s)"
cat /proc/swaps
grep -E '^(MemTotal|MemFree|SwapTotal|SwapFree):' /proc/meminfo | tr -s ' ' | tr '\n' ' '
echo
hog "$HOG"
RC=$?
echo "REMEMVM hog rc=$RC"
echo "REMEMVM vmstat $(grep -E '^(pswpin|pswpout) ' /proc/vmstat | tr '\n' ' ')"
run_command /tmp/exec-stop || finish FAIL "ExecStop rc=$?"
[ -e /sys/block/nbd0/pid ] && finish FAIL "nbd0 still connected after ExecStop"
grep -q '^/dev/nbd0 ' /proc/swaps && finish FAIL "swap still on after ExecStop"
if [ "$RC" = 0 ]; then finish PASS "hog verified $HOG MiB"; else finish FAIL "hog rc=$RC"; fi
