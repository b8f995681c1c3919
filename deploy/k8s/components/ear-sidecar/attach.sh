#!/bin/bash
# ear-sidecar attach helper: connects a kernel NBD device to the sidecar's Unix socket, puts a
# filesystem on it when it is blank, mounts it where the database container sees it (through mount
# propagation), and takes it all down again cleanly.
#
#   attach.sh run     attach + mkfs (only if blank) + mount, then supervise until SIGTERM
#   attach.sh check   probe: exit 0 when the filesystem is mounted and the NBD connection is alive
#   attach.sh detach  umount + flush + nbd-client -d (idempotent; used by preStop and on SIGTERM)
#
# Runs as root in a privileged container (see doc/kubernetes.md, "Security trade-off").
# Settings (environment):
#   ATTACH_SOCKET    sidecar socket                      (default /run/ear/ear.sock)
#   ATTACH_EXPORT    NBD export name                     (default tserver)
#   ATTACH_MOUNT     mount point; must lie inside the volume mounted with Bidirectional propagation
#                    (default /mnt/ear/data)
#   ATTACH_FSTYPE    filesystem made on a blank device: ext4 or xfs (default xfs)
#   ATTACH_FS_OWNER  uid:gid given to the filesystem root after mkfs (default 0:0)
#   ATTACH_STATE     where the chosen device name is recorded (default /run/ear-attach/device)
#   ATTACH_TIMEOUT   seconds to wait for the socket and the device (default 120)
#   ATTACH_NBD_MODE  netlink (default) or ioctl: how the kernel device is configured
#   ATTACH_DEAD_TIMEOUT  netlink mode: seconds the kernel holds I/O while the connection is dead,
#                    waiting for a reconnect, before failing it (default 120)
#   ATTACH_REQUEST_TIMEOUT  seconds before a request without an answer is retried on the
#                    (re)connected socket (netlink) or fails (ioctl) (default 30)
#
# Sidecar restarts (doc/kubernetes.md, "Sidecar restarts"): in netlink mode the kernel keeps the
# device and queues I/O for ATTACH_DEAD_TIMEOUT seconds after the connection dies, and
# `nbd-client -persist` stays to reconnect it. In ioctl mode (-nonetlink) a dead connection fails
# all I/O at once: the filesystem shuts down and the pod must be restarted.
set -euo pipefail

SOCKET=${ATTACH_SOCKET:-/run/ear/ear.sock}
EXPORT=${ATTACH_EXPORT:-tserver}
MNT=${ATTACH_MOUNT:-/mnt/ear/data}
FSTYPE=${ATTACH_FSTYPE:-xfs}
OWNER=${ATTACH_FS_OWNER:-0:0}
STATE=${ATTACH_STATE:-/run/ear-attach/device}
TIMEOUT=${ATTACH_TIMEOUT:-120}
MODE=${ATTACH_NBD_MODE:-netlink}
DEAD_TIMEOUT=${ATTACH_DEAD_TIMEOUT:-120}
REQUEST_TIMEOUT=${ATTACH_REQUEST_TIMEOUT:-30}

log() { echo "ear-attach: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mounted() { findmnt -rn --mountpoint "$MNT" >/dev/null 2>&1; }
recorded_dev() { [ -s "$STATE" ] && cat "$STATE"; }
connected() { [ -e "/sys/block/$1/pid" ]; }

check() {
    local dev
    dev=$(recorded_dev) || exit 1
    mounted && connected "$dev"
}

detach() {
    local dev i
    dev=$(recorded_dev || true)
    if mounted; then
        log "unmounting $MNT"
        for i in $(seq 1 30); do
            umount "$MNT" && break
            log "umount $MNT busy (attempt $i); retrying"
            sleep 1
        done
        if mounted; then
            # Only reached if something still holds the filesystem after the database container
            # has stopped; a lazy unmount is the lesser evil than leaving the node mount behind.
            log "WARNING: lazy unmount of $MNT"
            umount -l "$MNT" || true
        fi
    fi
    if [ -n "$dev" ] && connected "$dev"; then
        log "disconnecting /dev/$dev"
        blockdev --flushbufs "/dev/$dev" 2>/dev/null || true
        nbd-client -d "/dev/$dev" || log "WARNING: nbd-client -d /dev/$dev failed"
    fi
    rm -f "$STATE"
}

pick_and_connect() {
    local sys name
    [ -d /sys/module/nbd ] || die "the nbd kernel module is not loaded on this node (modprobe nbd nbds_max=16)"
    for sys in /sys/block/nbd*; do
        [ -e "$sys" ] || continue
        name=${sys##*/}
        connected "$name" && continue
        [ "$(cat "$sys/size")" = 0 ] || continue
        log "connecting /dev/$name to export '$EXPORT' on $SOCKET ($MODE mode)"
        # -nofork: we keep the client as our child and notice if it dies. -persist: it stays and
        # reconnects when the sidecar restarts.
        case "$MODE" in
            netlink)
                # The dead-connection timeout is a netlink-only setting; nbd-client takes it on
                # the command line from version 3.28 (3.27 applies 30 s in persist mode).
                local dead=()
                if nbd-client --help 2>&1 | grep -q -- '-dead-timeout'; then
                    dead=(-dead-timeout "$DEAD_TIMEOUT")
                fi
                nbd-client -unix "$SOCKET" "/dev/$name" -N "$EXPORT" -block-size 4096 \
                    -timeout "$REQUEST_TIMEOUT" "${dead[@]}" -nofork -persist &
                ;;
            ioctl)
                log "WARNING: ioctl mode: a sidecar restart fails the filesystem's I/O (use netlink)"
                nbd-client -unix "$SOCKET" "/dev/$name" -N "$EXPORT" -block-size 4096 \
                    -timeout "$REQUEST_TIMEOUT" -nonetlink -nofork -persist &
                ;;
            *) die "unsupported ATTACH_NBD_MODE '$MODE' (netlink or ioctl)" ;;
        esac
        NBD_PID=$!
        local t=0
        while [ "$t" -lt 20 ]; do
            if connected "$name" && [ "$(cat "$sys/size")" != 0 ]; then
                echo "$name" >"$STATE"
                return 0
            fi
            kill -0 "$NBD_PID" 2>/dev/null || break
            sleep 0.5
            t=$((t + 1))
        done
        kill "$NBD_PID" 2>/dev/null || true
        wait "$NBD_PID" 2>/dev/null || true
        log "/dev/$name could not be used (busy or refused); trying the next device"
    done
    die "no free /dev/nbdN device could be connected (raise nbds_max on the node?)"
}

run() {
    mkdir -p "$(dirname "$STATE")" "$MNT"
    trap 'detach; exit 0' TERM INT
    if mounted; then
        die "$MNT is already mounted (left over from a previous attach container?); restart the pod"
    fi
    local t=0
    while [ ! -S "$SOCKET" ]; do
        [ "$t" -lt "$TIMEOUT" ] || die "no socket at $SOCKET after ${TIMEOUT}s"
        sleep 1
        t=$((t + 1))
    done
    pick_and_connect
    local dev
    dev=/dev/$(recorded_dev)
    local found
    found=$(blkid -p -o value -s TYPE "$dev" 2>/dev/null || true)
    if [ -z "$found" ]; then
        if [ -n "$(blkid -p -o value -s PTTYPE "$dev" 2>/dev/null || true)" ]; then
            die "$dev has a partition table but no filesystem; refusing to format it"
        fi
        log "$dev is blank: creating $FSTYPE"
        case "$FSTYPE" in
            xfs) mkfs.xfs -q -K "$dev" ;;
            ext4) mkfs.ext4 -q -E nodiscard "$dev" ;;
            *) die "unsupported ATTACH_FSTYPE '$FSTYPE' (ext4 or xfs)" ;;
        esac
        found=$FSTYPE
    fi
    log "mounting $dev ($found) on $MNT"
    mount -t "$found" -o noatime "$dev" "$MNT"
    chown "$OWNER" "$MNT"
    log "ready: $MNT is backed by $dev through ear-sidecar"
    # Supervise: the client while it runs (`wait` returns early on SIGTERM so the trap runs);
    # in netlink mode the kernel holds the connection even after a client without persist
    # support has exited, so then watch the device itself.
    while true; do
        if kill -0 "$NBD_PID" 2>/dev/null; then
            wait "$NBD_PID" || true
            continue
        fi
        [ "$MODE" = netlink ] && connected "${dev#/dev/}" || break
        sleep 5 &
        wait $! || true
    done
    if mounted; then
        die "nbd-client exited while $MNT is mounted: the database sees I/O errors; restart the pod"
    fi
}

case "${1:-}" in
    run) run ;;
    check) check ;;
    detach) detach ;;
    *) echo "usage: $0 run|check|detach" >&2; exit 2 ;;
esac
