# Shared setup for scripts/demo, scripts/test, scripts/bench, scripts/package.
# Sourced, not executed. Installs the Debian packages and the .venv the project needs,
# so each top-level command works on a fresh Debian 12 machine as root.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

# Debian packages: the kernel tools tproxy drives, the lab's origin and peers, and the
# headers that netfilterqueue and systemd-python compile against.
APT_PACKAGES=(
    iptables iproute2 curl nginx-light wrk squid haproxy openssl conntrack procps util-linux
    python3 python3-venv python3-dev build-essential pkg-config
    libnetfilter-queue-dev libsystemd-dev
    debootstrap systemd-container debhelper dh-python python3-all-dev lintian vagrant vagrant-libvirt
)

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "$0: must run as root (network namespaces and netfilter rules)" >&2
        exit 1
    fi
}

ensure_apt() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "==> apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # Debian's nginx, squid and haproxy packages start system-wide services; the lab runs its
    # own instances inside namespaces, so the global ones are stopped where systemd manages them.
    local svc
    for svc in nginx squid haproxy; do
        if command -v systemctl >/dev/null && systemctl is-active -q "$svc" 2>/dev/null; then
            systemctl disable --now "$svc" >/dev/null 2>&1 || true
        fi
    done
}

ensure_venv() {
    local stamp="$VENV/.installed"
    if [ ! -x "$VENV/bin/python" ]; then
        rm -rf "$VENV"
        /usr/bin/python3 -m venv "$VENV"
    fi
    # The editable install records the checkout's path: a .venv left by a checkout that has
    # moved or gone imports nothing (or the old tree), so it is installed again.
    local here
    here="$(cd / && "$VENV/bin/python" -c 'import tproxy; print(tproxy.__file__)' 2>/dev/null || true)"
    if [ ! -f "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ] ||
       [ "$here" != "$REPO/tproxy/__init__.py" ]; then
        echo "==> pip install -e .[dev] into .venv"
        if ! { "$VENV/bin/pip" install -q --upgrade pip &&
               "$VENV/bin/pip" install -q -e "$REPO[dev]"; } >"$VENV/pip.log" 2>&1; then
            cat "$VENV/pip.log" >&2
            echo "pip install failed (log above, also in $VENV/pip.log)" >&2
            exit 1
        fi
        touch "$stamp"
    fi
}

setup_all() {
    need_root
    ensure_apt "${APT_PACKAGES[@]}"
    ensure_venv
}
