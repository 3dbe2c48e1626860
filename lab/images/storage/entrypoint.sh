#!/bin/bash
# storage: dbus and rpcbind first (ganesha registers with them), then ganesha and sshd.
set -e
mkdir -p /run/sshd /run/dbus /run/ganesha /exports /exports-plain
rm -f /run/dbus/pid
dbus-daemon --system --fork
rpcbind -w
ganesha.nfsd -F -L /dev/stderr -f /etc/ganesha/ganesha.conf &
/usr/sbin/sshd -D -e -h /lab/ssh_host_ed25519_key -o AuthorizedKeysFile=/lab/authorized_keys &
# Whichever dies first takes the container down, so a broken service is never mistaken for a good one.
wait -n
