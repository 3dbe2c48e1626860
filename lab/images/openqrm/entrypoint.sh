#!/bin/bash
# Start-up of the lab's real openQRM server, as an install sets it up: the database from openQRM's own
# schema (its OPENQRM_DB and OPENQRM_SERVER_IP_ADDRESS substituted), the administrator `openqrm` and the
# read-only user `viewer` (passwords from /lab, never in argv), apache, then the nfs-storage plugin's
# deployment type registered through image-action.php as the plugin's init does. /run/openqrm.ready marks
# the end; the lab registers the storage servers afterwards (lab/lab.py).
set -euo pipefail
BASE=/usr/share/openqrm
IP=$(hostname -i | awk '{print $1}')

/usr/local/sbin/lab-openqrm-db start
sed -e "s/OPENQRM_DB/openqrm/g" -e "s/OPENQRM_SERVER_IP_ADDRESS/$IP/g" "$BASE/etc/db/mysql/openqrm-mysql-init.sql" \
    | mariadb
admin_pw=$(cat /lab/openqrm.password)
viewer_pw=$(cat /lab/viewer.password)
{
    printf "UPDATE user_info SET user_password='%s' WHERE user_name='openqrm';\n" "$admin_pw"
    printf "INSERT INTO user_info (user_id, user_name, user_password, user_gender, user_first_name, user_last_name, user_department, user_office, user_role, user_last_update_time, user_description, user_capabilities, user_state, user_lang) VALUES (2, 'viewer', '%s', '-', '-', '-', '-', '-', 1, '-', 'lab read-only user', '', 'activated', 'en');\n" "$viewer_pw"
} | mariadb openqrm
rm -f "$BASE/web/base/.htpasswd"
printf '%s' "$admin_pw" | htpasswd -i -c -B "$BASE/web/base/.htpasswd" openqrm 2>/dev/null
printf '%s' "$viewer_pw" | htpasswd -i -B "$BASE/web/base/.htpasswd" viewer 2>/dev/null
chown www-data "$BASE/web/base/.htpasswd"
unset admin_pw viewer_pw

set +u; . /etc/apache2/envvars; set -u
mkdir -p "$APACHE_RUN_DIR" "$APACHE_LOCK_DIR" "$APACHE_LOG_DIR"
/usr/sbin/apache2 -D FOREGROUND &
apache=$!

# The nfs-storage plugin's init: openqrm_server_add_deployment_type (src/include/openqrm-server-functions).
python3 - "$IP" <<'PY'
import base64, sys, time, urllib.error, urllib.parse, urllib.request
ip = sys.argv[1]
pw = open("/lab/openqrm.password").read().strip()
q = urllib.parse.urlencode({"image_command": "add_deployment_type", "deployment_name": "nfs-deployment",
                            "deployment_type": "nfs-deployment", "deployment_description": "Nfs-root deployment",
                            "deployment_storagetype": "nfs-storage", "deployment_storagedescription": "NFS Storage",
                            "deployment_mapping": ""}, quote_via=urllib.parse.quote)
req = urllib.request.Request(f"http://{ip}/openqrm/base/server/image/image-action.php?{q}",
                             headers={"Authorization": "Basic " + base64.b64encode(f"openqrm:{pw}".encode()).decode()})
deadline = time.monotonic() + 60
while True:  # apache starting: poll until it answers
    try:
        urllib.request.urlopen(req, timeout=10).read()
        break
    except (urllib.error.URLError, ConnectionError) as e:
        if time.monotonic() > deadline:
            sys.exit(f"lab-openqrm: apache does not answer: {e}")
        time.sleep(0.1)
PY
n=$(mariadb --batch --skip-column-names openqrm -e "SELECT COUNT(*) FROM deployment_info WHERE deployment_type='nfs-deployment'")
if [ "$n" != 1 ]; then
    echo "lab-openqrm: the nfs-deployment type was not registered ($n rows)" >&2
    exit 1
fi
touch /run/openqrm.ready
echo "lab-openqrm: openQRM 5.3.60 ready on $IP"
wait "$apache"
