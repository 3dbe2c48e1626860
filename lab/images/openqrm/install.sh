#!/bin/bash
# Build time: lay openQRM out as its installer does (/usr/share/openqrm, the web tree linked into apache's
# document root), write openqrm-server.conf, the .htaccess and the httpd conf from openQRM's own templates,
# and make the database account the PHP code connects with. The schema itself is loaded at start-up
# (entrypoint.sh), when the server's IP address is known.
set -euo pipefail
BASE=/usr/share/openqrm
DOCROOT=/var/www/html
DB_PASSWORD=lab-db-only  # MariaDB's account for the PHP code; reachable only inside the container

cat > "$BASE/etc/openqrm-server.conf" <<CONF
# written by the qrmfs lab (lab/images/openqrm/install.sh)
OPENQRM_SERVER_BASE_DIR=/usr/share
OPENQRM_WEBSERVER_DOCUMENT_ROOT=$DOCROOT
OPENQRM_WEB_PROTOCOL=http
OPENQRM_DATABASE_TYPE=mysql
OPENQRM_DATABASE_SERVER=localhost
OPENQRM_DATABASE_NAME=openqrm
OPENQRM_DATABASE_USER=openqrm
OPENQRM_DATABASE_PASSWORD=$DB_PASSWORD
CONF
chmod 640 "$BASE/etc/openqrm-server.conf"
chgrp www-data "$BASE/etc/openqrm-server.conf"

ln -sfn "$BASE/web" "$DOCROOT/openqrm"
sed -e "s#OPENQRM_WEBSERVER_DOCUMENT_ROOT#$DOCROOT#g" "$BASE/etc/httpd/openqrm-htaccess.conf" > "$BASE/web/base/.htaccess"
sed -e "s#OPENQRM_WEBSERVER_DOCUMENT_ROOT#$DOCROOT#g" "$BASE/etc/httpd/openqrm-httpd.conf" \
    > /etc/apache2/conf-available/openqrm.conf
a2enconf -q openqrm
echo "ServerName lab-openqrm" > /etc/apache2/conf-available/servername.conf
a2enconf -q servername

# What the nfs-storage plugin's init links (src/plugins/nfs-storage/etc/init.d/openqrm-plugin-nfs-storage);
# its deployment type is registered over HTTP at start-up, as the init does.
mkdir -p "$BASE/web/base/plugins" "$BASE/web/boot-service"
ln -sfn "$BASE/plugins/nfs-storage/web" "$BASE/web/base/plugins/nfs-storage"
ln -sfn "$BASE/plugins/nfs-storage/web/root-mount.nfs-deployment" "$BASE/web/boot-service/root-mount.nfs-deployment"
ln -sfn "$BASE/plugins/nfs-storage/web/image.nfs-deployment.php" "$BASE/web/boot-service/image.nfs-deployment.php"

# The database account (the data directory is the one Debian's package made).
/usr/local/sbin/lab-openqrm-db start
mariadb <<SQL
CREATE USER 'openqrm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL PRIVILEGES ON openqrm.* TO 'openqrm'@'localhost';
SQL
/usr/local/sbin/lab-openqrm-db stop
