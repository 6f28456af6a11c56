#!/bin/sh
# Install opacityd as a systemd service on a Debian/Ubuntu machine. Run as root from a checkout:
#   deploy/install.sh [--low-port] [--venv PATH] [--no-enable]
# Creates the system user `opacityd`, a venv in $PREFIX/venv with the package, the state folder
# /var/lib/opacityd, /etc/opacityd/config.toml (kept if present) and the units. It does not
# start the service: put a model bundle in place and set model.bundle first (docs/operations.md).
#
# Every location can be moved with an environment variable (used by the test suite):
#   PREFIX=/opt/opacityd ETC_DIR=/etc/opacityd STATE_DIR=/var/lib/opacityd
#   UNIT_DIR=/etc/systemd/system SERVICE_USER=opacityd
set -eu

PREFIX=${PREFIX:-/opt/opacityd}
ETC_DIR=${ETC_DIR:-/etc/opacityd}
STATE_DIR=${STATE_DIR:-/var/lib/opacityd}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
SERVICE_USER=${SERVICE_USER:-opacityd}
SRC=$(cd "$(dirname "$0")/.." && pwd)
LOW_PORT=no
VENV=""
ENABLE=yes

while [ $# -gt 0 ]; do
    case "$1" in
        --low-port) LOW_PORT=yes ;;
        --venv) VENV=$2; shift ;;
        --no-enable) ENABLE=no ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it creates a system user and installs systemd units)" >&2
    exit 1
fi

step() { printf '==> %s\n' "$*"; }

if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    step "creating system user $SERVICE_USER"
    useradd --system --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
fi

if [ -z "$VENV" ]; then
    VENV=$PREFIX/venv
    step "installing opacityd into $VENV"
    mkdir -p "$PREFIX"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet "$SRC"
else
    step "using the existing venv $VENV"
fi
[ -x "$VENV/bin/opacityd" ] || { echo "install.sh: $VENV/bin/opacityd is missing" >&2; exit 1; }

step "state folder $STATE_DIR, config folder $ETC_DIR"
install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
install -d -m 0755 "$ETC_DIR"
if [ ! -e "$ETC_DIR/config.toml" ]; then
    sed -e "s|^state_dir = \"state\"|state_dir = \"$STATE_DIR\"|" "$SRC/config.toml" > "$ETC_DIR/config.toml"
    chmod 0640 "$ETC_DIR/config.toml"
    chgrp "$SERVICE_USER" "$ETC_DIR/config.toml"
    step "wrote $ETC_DIR/config.toml (edit peers, destinations and model.bundle)"
else
    step "kept the existing $ETC_DIR/config.toml"
fi
"$VENV/bin/opacityd" check-config "$ETC_DIR/config.toml"

step "installing units into $UNIT_DIR"
install -d "$UNIT_DIR"
for unit in opacityd.service opacityd-worker@.service opacityd-receiver@.service opacityd-gpu-worker@.service; do
    sed -e "s|/opt/opacityd/venv|$VENV|g" -e "s|/etc/opacityd|$ETC_DIR|g" \
        -e "s|/var/lib/opacityd|$STATE_DIR|g" -e "s|^User=opacityd|User=$SERVICE_USER|" \
        -e "s|^Group=opacityd|Group=$SERVICE_USER|" "$SRC/deploy/$unit" > "$UNIT_DIR/$unit"
done
if [ "$LOW_PORT" = yes ]; then
    install -d "$UNIT_DIR/opacityd.service.d"
    install -m 0644 "$SRC/deploy/opacityd.service.d/low-port.conf" "$UNIT_DIR/opacityd.service.d/"
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    [ "$ENABLE" = yes ] && systemctl enable opacityd.service
fi
step "done. Next: place a model bundle, set model.bundle in $ETC_DIR/config.toml, then"
echo "    systemctl start opacityd && journalctl -u opacityd -f"
