#!/usr/bin/env bash
# Origin: nginx serving a small page and a large file (for slow downloads through the proxy).
# Usage: origin.sh ORIGIN_IP LAN_CIDR GW_WAN_IP
source "$(dirname "$0")/common.sh" 2>/dev/null || source /tmp/tproxy-lab-common.sh
ORIGIN_IP=$1 LAN_CIDR=$2 GW_WAN_IP=$3

apt_install nginx-light
echo "hello from the origin ($ORIGIN_IP)" > /var/www/html/index.html
head -c 50M /dev/zero > /var/www/html/big.bin
# Rate-limit /big.bin so a download spans a `systemctl reload tproxy` on the gateway.
cat > /etc/nginx/sites-enabled/default <<'NGINX'
server {
    listen 80 default_server;
    root /var/www/html;
    location = /big.bin { limit_rate 1m; }
}
NGINX
systemctl restart nginx
# Replies to LAN clients go back through the gateway: with transparent upstream connections the
# gateway uses the client's own address as the source.
persist_route "$LAN_CIDR" "$GW_WAN_IP"
