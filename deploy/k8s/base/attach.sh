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
set -euo pipefail

SOCKET=${ATTACH_SOCKET:-/run/ear/ear.sock}
EXPORT=${ATTACH_EXPORT:-tserver}
MNT=${ATTACH_MOUNT:-/mnt/ear/data}
FSTYPE=${ATTACH_FSTYPE:-xfs}
OWNER=${ATTACH_FS_OWNER:-0:0}
STATE=${ATTACH_STATE:-/run/ear-attach/device}
TIMEOUT=${ATTACH_TIMEOUT:-120}

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
        log "connecting /dev/$name to export '$EXPORT' on $SOCKET"
        # -nonetlink: the nbd generic-netlink family is not visible from a pod's network namespace.
        # -nofork: we keep the daemon as our child and notice if it dies. -persist: reconnect if the
        # sidecar container restarts (in-flight requests may still fail; see doc/kubernetes.md).
        nbd-client -unix "$SOCKET" "/dev/$name" -N "$EXPORT" -block-size 4096 \
            -nonetlink -nofork -persist &
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
    # Supervise the NBD daemon; `wait` returns early on SIGTERM so the trap runs.
    while kill -0 "$NBD_PID" 2>/dev/null; do
        wait "$NBD_PID" || true
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
