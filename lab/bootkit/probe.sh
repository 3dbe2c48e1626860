#!/bin/sh
# The qrmfs lab boot probe (runs from this boot's tmpfs /run, with the image's /bin/sh and systemctl).
# Writes QRMFS-PROBE lines to ttyS0 (parsed by lab/boot.py), runs the optional per-boot test script,
# prints its output line by line with a QRMFS-OUT prefix, then powers the VM off.
tty=/dev/ttyS0
say() { printf 'QRMFS-PROBE %s\n' "$*" >"$tty"; }

read -r up _ </proc/uptime
say "reached multi-user.target uptime=$up"

# Let the rest of the start-up (e.g. graphical.target) finish, bounded, to report a final state.
if command -v timeout >/dev/null 2>&1; then
    state="$(timeout 120 systemctl is-system-running --wait 2>/dev/null)"
else
    state="$(systemctl is-system-running 2>/dev/null)"
fi
read -r up _ </proc/uptime
say "state=${state:-unknown} uptime=$up"
systemctl list-units --state=failed --no-legend --plain 2>/dev/null | while read -r unit _; do
    [ -n "$unit" ] && say "failed-unit $unit"
done

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
# qrmfs.poweroff=clean: a full, orderly shutdown (to test an image's shutdown), =reboot: the same through
# `reboot`; by default a forced one
# (processes killed, filesystems synced and remounted read-only, no unit stop jobs): an image whose
# networking.service takes eth0 down would otherwise hang on its own NFS root for minutes.
mode=force
read -r cmdline </proc/cmdline
set -f
for arg in $cmdline; do
    case "$arg" in qrmfs.poweroff=*) mode="${arg#qrmfs.poweroff=}" ;; esac
done
set +f
if [ "$mode" = clean ]; then
    systemctl --no-block poweroff
elif [ "$mode" = reboot ]; then
    reboot  # the command an operator types (QEMU's -no-reboot ends the VM)
else
    systemctl --no-block poweroff --force
fi
