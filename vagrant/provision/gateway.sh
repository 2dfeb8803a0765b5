#!/usr/bin/env bash
# Gateway: forward between LAN and WAN, install the tproxy .deb, intercept the LAN interface.
# Usage: gateway.sh GW_LAN_IP DEB
source "$(dirname "$0")/common.sh" 2>/dev/null || source /tmp/tproxy-lab-common.sh
GW_LAN_IP=$1 DEB=$2

cat > /etc/sysctl.d/60-tproxy-lab.conf <<'SYSCTL'
# The lab gateway routes between the client and origin networks.
net.ipv4.ip_forward = 1
SYSCTL
sysctl -q --system

LAN_IF="$(iface_of "$GW_LAN_IP")"
[ -n "$LAN_IF" ] || { echo "no interface has $GW_LAN_IP" >&2; exit 1; }

# The config first, so the service starts intercepting straight from the package's postinst.
mkdir -p /etc/tproxy
cat > /etc/tproxy/tproxy.toml <<TOML
# Written by vagrant/provision/gateway.sh; the documented default file is tproxy.toml.dpkg-dist.
[proxy]
lan_interfaces = ["$LAN_IF"]
TOML

apt-get update -qq
# apt resolves the Debian dependencies (python3-dpkt, python3-systemd, iptables...).
apt-get install -y -qq -o Dpkg::Options::=--force-confold "$DEB"
systemctl enable --now tproxy.service
systemctl is-active tproxy.service
