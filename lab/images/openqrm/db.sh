#!/bin/bash
# lab-openqrm-db start|stop|status: the openQRM server's MariaDB (for "database is down" tests).
# start and stop return once the server answers / no longer answers (polled, 60 s at most).
set -euo pipefail
answers() { mariadb-admin --silent ping >/dev/null 2>&1; }
until_() {  # until_ WANT: poll until answers() is WANT (0 = answers, 1 = does not)
    for _ in $(seq 600); do
        if answers; then [ "$1" = 0 ] && return 0; else [ "$1" = 1 ] && return 0; fi
        sleep 0.1
    done
    echo "lab-openqrm-db: MariaDB still $([ "$1" = 0 ] && echo 'does not answer' || echo answers) after 60 s" >&2
    return 1
}
case "${1:-}" in
    start)
        answers && exit 0
        install -d -o mysql -g mysql /run/mysqld
        setsid /usr/sbin/mariadbd --user=mysql </dev/null >>/var/log/lab-mariadb.log 2>&1 &
        until_ 0 ;;
    stop)
        answers || exit 0
        mariadb-admin shutdown
        until_ 1 ;;
    status)
        answers ;;
    *)
        echo "usage: lab-openqrm-db start|stop|status" >&2; exit 2 ;;
esac
