#!/bin/sh
# A lab source host: sshd only (no init runs in the container); keys from the lab's state dir (/lab).
set -e
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e -h /lab/ssh_host_ed25519_key -o AuthorizedKeysFile=/lab/authorized_keys
