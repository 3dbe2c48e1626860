#!/bin/sh
# The qrmfs lab boot probe for SysV init. The initramfs appended it to a tmpfs copy of the image's
# /etc/inittab as a `once` entry after the runlevel's `wait` rc entry, so init starts it when the rc
# scripts are done. Writes QRMFS-PROBE lines to ttyS0 (parsed by lab/boot), runs the optional test
# script (its output as QRMFS-OUT lines), then powers the VM off.
tty=/dev/ttyS0
say() { printf 'QRMFS-PROBE %s\n' "$*" >"$tty"; }

read -r up _ </proc/uptime
level="$(runlevel 2>/dev/null | cut -d' ' -f2)"
say "reached runlevel ${level:-?} init=sysv uptime=$up"
say "state=rc-done uptime=$up"

if [ -f /run/qrmfs-probe/test.sh ]; then
    say "script-begin"
    /bin/sh /run/qrmfs-probe/test.sh >/run/qrmfs-probe/test.out 2>&1 </dev/null
    rc=$?
    while IFS= read -r line || [ -n "$line" ]; do
        printf 'QRMFS-OUT %s\n' "$line" >"$tty"
    done </run/qrmfs-probe/test.out
    say "script-end rc=$rc"
fi
say "done"
sync
# qrmfs.poweroff=clean: init's runlevel 0 (the rc scripts' stop actions), =reboot: runlevel 6 through `reboot`;
# by default a forced power-off
# (filesystems synced, no rc scripts): an image whose networking script takes eth0 down would otherwise
# hang on its own NFS root.
mode=force
read -r cmdline </proc/cmdline
set -f
for arg in $cmdline; do
    case "$arg" in qrmfs.poweroff=*) mode="${arg#qrmfs.poweroff=}" ;; esac
done
set +f
if [ "$mode" = clean ]; then
    exec /sbin/init 0
elif [ "$mode" = reboot ]; then
    exec /sbin/reboot  # the command an operator types: halt -> shutdown -r -> /sbin/init 6 (QEMU's -no-reboot ends the VM)
else
    exec /sbin/poweroff -f
fi
