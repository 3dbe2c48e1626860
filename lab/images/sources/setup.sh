#!/bin/sh
# Run once while the image of a lab source host is built: make the debootstrap tree look like a host that
# has been in use, with what qrmfs's preparation must remove or change.
set -eu
# An identity, NIC rules, DHCP on eth0, a log, and a private-directory seed for --private-add tests.
echo 0123456789abcdef0123456789abcdef > /etc/machine-id
mkdir -p /etc/udev/rules.d /var/lib/app/global /etc/network
printf 'SUBSYSTEM=="net", ACTION=="add", ATTR{address}=="52:54:00:12:34:56", NAME="eth0"\n' \
    > /etc/udev/rules.d/70-persistent-net.rules
printf 'auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n' > /etc/network/interfaces
echo "lab source built" > /var/log/lab-source.log
echo from-the-image > /var/lib/app/seed.txt
echo common > /var/lib/app/global/from-image
# Host keys as a used host has them (qrmfs removes them; a node must make its own).
ssh-keygen -A >/dev/null

if [ -f /etc/inittab ] && ! [ -e /lib/systemd/systemd ]; then
    # SysV: a getty on the serial console, as a diskless node with a serial console has it, and the
    # manual's kudzu (a stand-in that says so when it runs: qrmfs turns its S links into K links).
    sed -i 's|^#\?T0:23:respawn:.*|T0:23:respawn:/sbin/getty -L ttyS0 115200 vt100|' /etc/inittab
    grep -q '^T0:' /etc/inittab || echo 'T0:23:respawn:/sbin/getty -L ttyS0 115200 vt100' >> /etc/inittab
    cat > /etc/init.d/kudzu <<'KUDZU'
#!/bin/sh
### BEGIN INIT INFO
# Provides:          kudzu
# Required-Start:    $local_fs
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:
# Short-Description: stand-in for Red Hat's kudzu hardware probe (the qrm manual disables it)
### END INIT INFO
case "$1" in
    start) echo "kudzu: probing hardware (this must not run on a diskless node)"; exit 1 ;;
    *) exit 0 ;;
esac
KUDZU
    chmod 755 /etc/init.d/kudzu
    for l in 2 3 4 5; do ln -sf ../init.d/kudzu "/etc/rc$l.d/S01kudzu"; done
fi
