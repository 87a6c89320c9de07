#!/bin/sh
# Two "hosts" on one machine for dirtylog's two-host migrations (issue #7).
#
#   scripts/two-hosts.sh up   STATE_DIR   # idempotent: creates what is missing, starts the sshds
#   scripts/two-hosts.sh down STATE_DIR   # idempotent: stops the sshds, deletes the namespaces
#   scripts/two-hosts.sh status STATE_DIR
#
# Layout (controller = the root network namespace, where dirtylog runs):
#
#   root ns  dl-sctl 10.231.1.1/30 <-veth-> ctl0 10.231.1.2/30  netns dl-src  (sshd :22)
#   root ns  dl-dctl 10.231.2.1/30 <-veth-> ctl0 10.231.2.2/30  netns dl-dst  (sshd :22)
#   dl-src   mig0    10.232.0.1/30 <-veth-> mig0 10.232.0.2/30  dl-dst        (migration network)
#
# The control path (SSH: commands, QMP and serial forwarding) never crosses the migration veth,
# so `ip -n dl-src link set mig0 down` cuts the migration only. net.ipv4.tcp_retries2=5 in both
# namespaces makes a TCP connection over a cut link fail in ~15 s instead of ~15 min.
#
# STATE_DIR gets: ssh/ (client key id_ed25519, known_hosts with both host keys, hosts.env),
# src/ and dst/ (sshd_config, host key, authorized_keys, sshd.pid, sshd.log, run/ which is
# bind-mounted over /run inside the namespace for sshd's privilege-separation directory).
# sshd runs with StrictModes yes: STATE_DIR must not lie below a group- or world-writable
# directory such as /tmp (use e.g. /var/lib/dirtylog/two-hosts).
#
# Namespace names and address prefixes can be changed with DL_NS_PREFIX (default "dl"),
# DL_CTL_NET (default 10.231) and DL_MIG_NET (default 10.232.0).
set -eu

P=${DL_NS_PREFIX:-dl}
CTL=${DL_CTL_NET:-10.231}
MIG=${DL_MIG_NET:-10.232.0}
SRC_NS=$P-src
DST_NS=$P-dst

die() { echo "two-hosts.sh: error: $*" >&2; exit 2; }

[ $# -eq 2 ] || die "usage: $0 up|down|status STATE_DIR"
ACTION=$1
STATE=$2
[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, sshd)"
for tool in ip ssh ssh-keygen ssh-keyscan; do
    command -v $tool >/dev/null || die "$tool not found (apt-get install iproute2 openssh-client)"
done

ns_exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

sshd_pid() {  # pid of the running sshd of side $1, or nothing
    f=$STATE/$1/sshd.pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    [ -n "$pid" ] && [ -d /proc/$pid ] && grep -q sshd /proc/$pid/comm 2>/dev/null && echo "$pid"
    return 0
}

check_state_path() {  # StrictModes: no group/world-writable directory above the key files
    d=$STATE
    while [ "$d" != / ]; do
        if [ -e "$d" ]; then
            mode=$(stat -c %a "$d")
            owner=$(stat -c %u "$d")
            case $mode in
                *[2367][0-7]|*[0-7][2367]) die "$d is mode $mode (group/world-writable): sshd's StrictModes would refuse the keys below it; choose a STATE_DIR elsewhere (e.g. /var/lib/dirtylog/two-hosts)";;
            esac
            [ "$owner" = 0 ] || die "$d is owned by uid $owner, not root (StrictModes)"
        fi
        d=$(dirname "$d")
    done
}

veth_pair() {  # name_a ns_a(or -) name_b ns_b ; created once
    a=$1; na=$2; b=$3; nb=$4
    if [ "$na" = - ]; then
        ip link show "$a" >/dev/null 2>&1 && return 0
    else
        ip -n "$na" link show "$a" >/dev/null 2>&1 && return 0
    fi
    tmpa=$P-t$$a; tmpb=$P-t$$b
    ip link add "$tmpa" type veth peer name "$tmpb"
    if [ "$na" = - ]; then ip link set "$tmpa" name "$a"; else ip link set "$tmpa" netns "$na"; ip -n "$na" link set "$tmpa" name "$a"; fi
    ip link set "$tmpb" netns "$nb"
    ip -n "$nb" link set "$tmpb" name "$b"
}

side_addr() { if [ "$1" = src ]; then echo "$CTL.1.2"; else echo "$CTL.2.2"; fi; }
side_ns() { if [ "$1" = src ]; then echo "$SRC_NS"; else echo "$DST_NS"; fi; }

up() {
    case $STATE in /*) ;; *) STATE=$(pwd)/$STATE;; esac
    mkdir -p "$STATE"
    chmod 0700 "$STATE"
    check_state_path
    for ns in $SRC_NS $DST_NS; do
        ns_exists "$ns" || ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip netns exec "$ns" sysctl -q -w net.ipv4.tcp_retries2=5
    done
    veth_pair "$P-sctl" - ctl0 "$SRC_NS"
    veth_pair "$P-dctl" - ctl0 "$DST_NS"
    veth_pair mig0 "$SRC_NS" mig0 "$DST_NS"
    ip addr replace "$CTL.1.1/30" dev "$P-sctl"
    ip addr replace "$CTL.2.1/30" dev "$P-dctl"
    ip link set "$P-sctl" up
    ip link set "$P-dctl" up
    ip -n "$SRC_NS" addr replace "$CTL.1.2/30" dev ctl0
    ip -n "$DST_NS" addr replace "$CTL.2.2/30" dev ctl0
    ip -n "$SRC_NS" addr replace "$MIG.1/30" dev mig0
    ip -n "$DST_NS" addr replace "$MIG.2/30" dev mig0
    for ns in $SRC_NS $DST_NS; do
        ip -n "$ns" link set ctl0 up
        ip -n "$ns" link set mig0 up
    done

    mkdir -p "$STATE/ssh"
    chmod 0700 "$STATE/ssh"
    [ -f "$STATE/ssh/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C dirtylog-controller -f "$STATE/ssh/id_ed25519"
    : > "$STATE/ssh/known_hosts.new"
    for side in src dst; do
        d=$STATE/$side
        mkdir -p "$d/run/sshd"
        chmod 0700 "$d"
        chmod 0755 "$d/run" "$d/run/sshd"
        [ -f "$d/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C "dirtylog-$side" -f "$d/ssh_host_ed25519_key"
        cp "$STATE/ssh/id_ed25519.pub" "$d/authorized_keys"
        chmod 0600 "$d/authorized_keys"
        addr=$(side_addr $side)
        cat > "$d/sshd_config" <<EOF
# dirtylog two-hosts: the "$side" host (network namespace $(side_ns $side))
ListenAddress $addr:22
HostKey $d/ssh_host_ed25519_key
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes yes
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
StreamLocalBindUnlink yes
X11Forwarding no
PrintMotd no
PrintLastLog no
MaxSessions 32
MaxStartups 64
ClientAliveInterval 5
ClientAliveCountMax 6
LogLevel VERBOSE
EOF
        echo "$addr $(cut -d' ' -f1-2 "$d/ssh_host_ed25519_key.pub")" >> "$STATE/ssh/known_hosts.new"
        if [ -z "$(sshd_pid $side)" ]; then
            # ip netns exec gives a private mount namespace: our run/ replaces /run for sshd only.
            ip netns exec "$(side_ns $side)" sh -c \
                "mount --bind '$d/run' /run && /usr/sbin/sshd -t -f '$d/sshd_config' && exec /usr/sbin/sshd -f '$d/sshd_config' -E '$d/sshd.log'" \
                || die "sshd of $side did not start (sshd -t -f $d/sshd_config; log $d/sshd.log)"
        fi
    done
    mv "$STATE/ssh/known_hosts.new" "$STATE/ssh/known_hosts"
    cat > "$STATE/ssh/hosts.env" <<EOF
SRC_NS=$SRC_NS
DST_NS=$DST_NS
SRC_HOST=root@$CTL.1.2
DST_HOST=root@$CTL.2.2
SRC_MIGRATION_ADDRESS=$MIG.1
DST_MIGRATION_ADDRESS=$MIG.2
SSH_IDENTITY=$STATE/ssh/id_ed25519
KNOWN_HOSTS=$STATE/ssh/known_hosts
EOF
    # Wait until both sshds accept connections (bounded).
    for side in src dst; do
        i=0
        until ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$STATE/ssh/known_hosts" \
                  -o ConnectTimeout=2 -i "$STATE/ssh/id_ed25519" -o IdentitiesOnly=yes \
                  "root@$(side_addr $side)" true 2>/dev/null; do
            i=$((i + 1))
            [ $i -lt 20 ] || die "sshd of $side does not accept the client key (see $STATE/$side/sshd.log)"
            sleep 0.25
        done
    done
    echo "two-hosts: up ($STATE/ssh/hosts.env)"
}

down() {
    case $STATE in /*) ;; *) STATE=$(pwd)/$STATE;; esac
    for side in src dst; do
        pid=$(sshd_pid $side)
        if [ -n "$pid" ]; then
            kill "$pid" 2>/dev/null || true
            i=0; while [ -d /proc/$pid ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i + 1)); done
            [ -d /proc/$pid ] && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$STATE/$side/sshd.pid"
    done
    for ns in $SRC_NS $DST_NS; do
        if ns_exists "$ns"; then
            # Whatever still runs in the namespace (sessions, QEMUs started over SSH) ends with it.
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$ns"
        fi
    done
    ip link del "$P-sctl" 2>/dev/null || true
    ip link del "$P-dctl" 2>/dev/null || true
    echo "two-hosts: down"
}

status() {
    for ns in $SRC_NS $DST_NS; do
        if ns_exists "$ns"; then echo "$ns: present, pids: $(ip netns pids "$ns" | tr '\n' ' ')"; else echo "$ns: absent"; fi
    done
    for side in src dst; do echo "sshd $side: $(sshd_pid $side)"; done
}

case $ACTION in
    up) up;;
    down) down;;
    status) status;;
    *) die "usage: $0 up|down|status STATE_DIR";;
esac
