#!/bin/bash
# source: the fixture area is made at start (docker layers drop ACLs, most xattrs and sockets), then sshd.
set -e
mkdir -p /run/sshd
[ -e /srv/fixture/.complete ] || python3 /usr/local/sbin/lab-make-fixture /srv/fixture
exec /usr/sbin/sshd -D -e -h /lab/ssh_host_ed25519_key -o AuthorizedKeysFile=/lab/authorized_keys
