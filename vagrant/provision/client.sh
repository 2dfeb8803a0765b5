#!/usr/bin/env bash
# Client: reach the origin network through the gateway; no proxy settings anywhere.
# Usage: client.sh CLIENT_IP WAN_CIDR GW_LAN_IP ORIGIN_IP
source "$(dirname "$0")/common.sh" 2>/dev/null || source /tmp/tproxy-lab-common.sh
CLIENT_IP=$1 WAN_CIDR=$2 GW_LAN_IP=$3 ORIGIN_IP=$4

apt_install curl
persist_route "$WAN_CIDR" "$GW_LAN_IP"
curl -fsS --max-time 10 "http://$ORIGIN_IP/" || echo "origin not reachable yet (provision origin and gateway first)" >&2
