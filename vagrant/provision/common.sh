# Helpers shared by the provisioning scripts (sourced).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# The interface that carries ADDRESS: names differ between providers (eth1, ens6, enp0s8...).
iface_of() {
    ip -o -4 addr show | awk -v a="$1" '{ split($4, p, "/"); if (p[1] == a) print $2 }' | head -1
}

# A static route that survives reboots: a systemd-networkd-free way that works with ifupdown,
# which Debian's vagrant boxes use.
persist_route() {  # CIDR VIA
    ip route replace "$1" via "$2"
    local hook=/etc/network/if-up.d/tproxy-lab-route
    cat > "$hook" <<HOOK
#!/bin/sh
ip route replace $1 via $2 2>/dev/null || true
HOOK
    chmod 0755 "$hook"
}

apt_install() {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@"
}
