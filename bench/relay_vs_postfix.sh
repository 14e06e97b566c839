#!/usr/bin/env bash
# The smtp365 relay next to a private Postfix under the same load, in one run.
#
#   bash bench/relay_vs_postfix.sh                      # N=2000, sessions "1 10 50"
#   bash bench/relay_vs_postfix.sh --quick              # N=300 smoke run
#   bash bench/relay_vs_postfix.sh --baseline-aiosmtpd  # also aiosmtpd + fsync, no forwarding
#   N=5000 SESSIONS="10 50" bash bench/relay_vs_postfix.sh
#
# Load: Postfix's smtp-source (10 KB messages, 1/10/50 parallel sessions, one connection per
# message unless --reuse). Both servers forward to the same smtp-sink, whose running counter
# gives the end-to-end time. Peak RSS and PSS are summed over the server's process tree,
# sampled from /proc every 100 ms. Every (server, sessions) run gets a fresh server, fresh
# state and a fresh sink; runs are interleaved by session count.
#
# Postfix is never installed: `apt-get download postfix` into
# ${XDG_CACHE_HOME:-$HOME/.cache}/smtp365-bench/postfix/, `dpkg -x`, and run from there with
# its own config, queue and data directories under a temp dir, chroot off, listening on
# 127.0.0.1 only. Needs root (Postfix's master, and the `postfix` user and `postdrop` group,
# created with useradd/groupadd when missing). Nothing leaves 127.0.0.1; every process this
# script starts is stopped at exit.
set -euo pipefail

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options (environment variable in brackets):
  -n, --messages N        messages per measured run [N, default 2000]
  -s, --sessions "LIST"   parallel smtp-source sessions [SESSIONS, default "1 10 50"]
  --quick                 N=300
  --reuse                 smtp-source -d: all messages of a session over one connection [REUSE=1]
  --baseline-aiosmtpd     also measure bench/aiosmtpd_fsync_server.py [BASELINE=1]
  --relay-asyncio         also measure the relay on asyncio's own event loop instead of
                          uvloop (server "relay-asyncio") [RELAY_ASYNCIO=1]
  --no-relay              skip the smtp365 relay
  --timeout SECONDS       per run, for the sink to get everything [TIMEOUT, default 300]
  --out FILE              also keep the results as JSON lines
  --keep                  keep the work directory (configs, logs, queues)
EOF
}

cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=$REPO/.venv/bin/python
SMTP365=${SMTP365:-$REPO/.venv/bin/smtp365}
HELPER=$REPO/bench/relay_vs_postfix.py

N=${N:-2000}
SESSIONS=${SESSIONS:-"1 10 50"}
SIZE=10240
REUSE=${REUSE:-0}
BASELINE=${BASELINE:-0}
RELAY_ASYNCIO=${RELAY_ASYNCIO:-0}
TIMEOUT=${TIMEOUT:-300}
RELAY=1
KEEP=0
OUT=""
while (($#)); do
    case $1 in
    -n | --messages) N=$2; shift ;;
    -s | --sessions) SESSIONS=$2; shift ;;
    --quick) N=300 ;;
    --reuse) REUSE=1 ;;
    --baseline-aiosmtpd) BASELINE=1 ;;
    --relay-asyncio) RELAY_ASYNCIO=1 ;;
    --no-relay) RELAY=0 ;;
    --timeout) TIMEOUT=$2; shift ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '%s\n' "$*"; }
run_shown() { say "+ $*"; "$@"; }
die() { say "error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: Postfix's master needs it (and the postfix user)"
[ -x "$PY" ] || die "no $PY: make the virtualenv first (make test, or python3 -m venv .venv && .venv/bin/pip install -e '.[dev]')"
((N >= 1)) || die "N must be >= 1"

# ---------------------------------------------------------------------------------------------
# Postfix binaries: downloaded and unpacked, never installed

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/smtp365-bench/postfix
mkdir -p "$CACHE"
fetch() { # PACKAGE -> path of its .deb in $CACHE
    local pkg=$1 deb
    deb=$(ls -t "$CACHE/${pkg}_"*.deb 2>/dev/null | head -1 || true)
    if [ -z "$deb" ]; then
        say "+ (cd $CACHE && apt-get download $pkg)" >&2
        if ! (cd "$CACHE" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2); then
            say "+ apt-get update -qq (package lists may be missing)" >&2
            apt-get update -qq >&2
            (cd "$CACHE" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2)
        fi
        deb=$(ls -t "$CACHE/${pkg}_"*.deb | head -1)
    fi
    printf '%s\n' "$deb"
}
PFDEB=$(fetch postfix)
PFVER=$(dpkg-deb -f "$PFDEB" Version)
PFROOT=$CACHE/root-$PFVER
if [ ! -x "$PFROOT/usr/sbin/smtp-source" ]; then
    run_shown dpkg -x "$PFDEB" "$PFROOT"
fi
# the binaries have RUNPATH /usr/lib/postfix; point them at the unpacked copy instead
LIBPATH=$PFROOT/usr/lib/postfix
missing_libs() {
    local b
    for b in "$PFROOT"/usr/sbin/{postfix,postconf,smtp-source,smtp-sink} \
        "$PFROOT"/usr/lib/postfix/sbin/{master,smtpd,smtp,cleanup,qmgr,trivial-rewrite}; do
        LD_LIBRARY_PATH=$LIBPATH ldd "$b" | awk '/not found/ {print $1}'
    done | sort -u
}
if [ -n "$(missing_libs)" ]; then
    say "shared libraries missing: $(missing_libs | tr '\n' ' ')"
    # unpack (not install) postfix's library dependencies that are not installed
    for pkg in $(apt-cache depends --important postfix | awk '/Depends: lib/ {print $2}'); do
        dpkg -s "$pkg" >/dev/null 2>&1 && continue
        run_shown dpkg -x "$(fetch "$pkg")" "$PFROOT"
    done
    LIBPATH=$LIBPATH:$PFROOT/usr/lib/x86_64-linux-gnu:$PFROOT/lib/x86_64-linux-gnu
    [ -z "$(missing_libs)" ] || die "still missing: $(missing_libs | tr '\n' ' ')"
fi

# Postfix's daemons run as mail_owner and refuse root; postqueue/postdrop belong to postdrop
if ! getent group postdrop >/dev/null; then
    run_shown groupadd --system postdrop
fi
if ! getent passwd postfix >/dev/null; then
    if getent group postfix >/dev/null; then
        run_shown useradd --system --gid postfix --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin postfix
    else
        run_shown useradd --system --user-group --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin postfix
    fi
fi
for b in postqueue postdrop; do # as the package's postinst would; silences `postfix check`
    if [ "$(stat -c %G:%a "$PFROOT/usr/sbin/$b")" != postdrop:2755 ]; then
        run_shown chgrp postdrop "$PFROOT/usr/sbin/$b"
        run_shown chmod 2755 "$PFROOT/usr/sbin/$b"
    fi
done

# ---------------------------------------------------------------------------------------------
# work directory, wrappers, cleanup

# on disk (not a tmpfs /tmp): both servers fsync their queues there
WORK=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/smtp365-bench.XXXXXX")
chmod 755 "$WORK" # the postfix user walks into its queue below it
RESULTS=$WORK/results.jsonl
mkdir -p "$WORK/bin"
for b in postfix postconf smtp-source smtp-sink; do
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$LIBPATH" "$PFROOT/usr/sbin/$b" \
        >"$WORK/bin/$b"
    chmod +x "$WORK/bin/$b"
done
PFBIN=$WORK/bin

SINK_PID=""
SERVER_KIND=""
SERVER_PID=""
SERVER_DIR=""

kill_tree() { # PID: TERM the process and its descendants, KILL what is left after 5 s
    local pids p i
    pids=$("$PY" "$HELPER" tree "$1")
    [ -n "$pids" ] || return 0
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
    for i in $(seq 50); do
        pids=$(for p in $pids; do [ -d /proc/$p ] && echo "$p"; done || true)
        [ -z "$pids" ] && return 0
        sleep 0.1
    done
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
}

wait_gone() { # PID SECONDS
    local i
    for i in $(seq $(($2 * 10))); do
        [ -d "/proc/$1" ] || return 0
        # reap if it is our child
        if ! kill -0 "$1" 2>/dev/null; then return 0; fi
        if [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ]; then
            wait "$1" 2>/dev/null || true
            return 0
        fi
        sleep 0.1
    done
    return 1
}

stop_sink() {
    [ -n "$SINK_PID" ] || return 0
    kill -TERM "$SINK_PID" 2>/dev/null || true
    wait_gone "$SINK_PID" 5 || kill -KILL "$SINK_PID" 2>/dev/null || true
    wait "$SINK_PID" 2>/dev/null || true
    SINK_PID=""
}

stop_server() {
    [ -n "$SERVER_KIND" ] || return 0
    case $SERVER_KIND in
    postfix)
        local pids
        pids=""
        [ -n "$SERVER_PID" ] && pids=$("$PY" "$HELPER" tree "$SERVER_PID")
        "$PFBIN/postfix" -c "$SERVER_DIR/etc" stop >/dev/null 2>&1 || true
        if [ -n "$SERVER_PID" ] && ! wait_gone "$SERVER_PID" 20; then
            say "postfix did not stop in 20 s; killing its processes"
            "$PFBIN/postfix" -c "$SERVER_DIR/etc" abort >/dev/null 2>&1 || true
        fi
        # the children notice the master is gone by themselves; make sure
        for p in $pids; do
            [ -d "/proc/$p" ] && kill_tree "$p"
        done
        ;;
    relay | baseline)
        if [ -n "$SERVER_PID" ]; then
            kill -TERM "$SERVER_PID" 2>/dev/null || true
            if ! wait_gone "$SERVER_PID" 45; then
                say "$SERVER_KIND did not exit within 45 s of SIGTERM; killing it"
                kill_tree "$SERVER_PID"
            fi
            wait "$SERVER_PID" 2>/dev/null || true
        fi
        ;;
    esac
    SERVER_KIND=""
    SERVER_PID=""
}

leftovers() { # processes of this run still alive: Postfix binaries from the cache, or $WORK
    local d exe cmd
    for d in /proc/[0-9]*; do
        [ "${d#/proc/}" = $$ ] && continue
        exe=$(readlink "$d/exe" 2>/dev/null || true)
        cmd=$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null || true)
        if [[ $exe == "$PFROOT"/* || $cmd == *"$WORK/"* ]]; then
            echo "${d#/proc/}"
        fi
    done
}

cleanup() {
    local rc=$? left
    set +e
    trap - EXIT INT TERM
    stop_server
    stop_sink
    left=$(leftovers)
    if [ -n "$left" ]; then
        say "processes left behind, stopping them: $(echo $left)"
        for p in $left; do kill_tree "$p"; done
        left=$(leftovers)
    fi
    if [ -z "$left" ]; then
        say "cleanup: no benchmark processes left"
    else
        say "cleanup: still running: $(echo $left)"
    fi
    if ((KEEP)); then
        say "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# the sink and the servers

start_sink() { # PORT LOG
    "$PFBIN/smtp-sink" -u postfix -c "127.0.0.1:$1" 1024 >"$2" 2>&1 &
    SINK_PID=$!
    "$PY" "$HELPER" wait-smtp --port "$1" --timeout 10 --pid "$SINK_PID" ||
        die "smtp-sink did not start (see $2)"
}

postfix_config() { # DIR SMTPD_PORT SINK_PORT
    local dir=$1
    mkdir -p "$dir/etc" "$dir/spool" "$dir/data"
    chown postfix: "$dir/data" # master.lock and friends are created as the mail owner
    cat >"$dir/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $dir/spool
data_directory = $dir/data
daemon_directory = $PFROOT/usr/lib/postfix/sbin
command_directory = $PFROOT/usr/sbin
shlib_directory = $PFROOT/usr/lib/postfix
meta_directory = $PFROOT/etc/postfix
mail_owner = postfix
setgid_group = postdrop
# Postfix scrubs the environment of its daemons; they need the unpacked libraries
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME LD_LIBRARY_PATH=$LIBPATH
maillog_file = $dir/maillog
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.bench
mydomain = bench
myorigin = \$myhostname
# no local delivery: everything goes to the relayhost (the sink)
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled
alias_maps =
alias_database =
relay_domains =
relayhost = [127.0.0.1]:$3
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
smtpd_tls_security_level = none
smtp_dns_support_level = disabled
biff = no
EOF
    # Debian's master.cf without chroot (the unpacked tree has no chroot jail) and without the
    # pipe(8) examples; smtpd on the chosen port instead of 25
    cat >"$dir/etc/master.cf" <<EOF
127.0.0.1:$2 inet n  -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
        -o syslog_name=postfix/\$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
}

PF_CHECKED=0
start_postfix() { # DIR PORT SINK_PORT
    local dir=$1 out
    postfix_config "$dir" "$2" "$3"
    SERVER_DIR=$dir
    out=$("$PFBIN/postfix" -c "$dir/etc" check 2>&1) || die "postfix check failed: $out"
    if ((!PF_CHECKED)); then
        PF_CHECKED=1
        if [ -n "$out" ]; then say "postfix check: $out"; else say "postfix check: clean"; fi
    fi
    SERVER_KIND=postfix
    "$PFBIN/postfix" -c "$dir/etc" start >"$dir/start.log" 2>&1 ||
        die "postfix start failed: $(cat "$dir/start.log"; tail -5 "$dir/maillog" 2>/dev/null)"
    SERVER_PID=$(tr -d ' \n' <"$dir/spool/pid/master.pid")
    "$PY" "$HELPER" wait-smtp --port "$2" --timeout 30 --pid "$SERVER_PID" ||
        die "postfix smtpd did not greet (see $dir/maillog)"
}

start_relay() { # DIR PORT SINK_PORT [EVENT_LOOP]
    local dir=$1
    mkdir -p "$dir"
    cat >"$dir/relay.toml" <<EOF
default_account = "sink"

[accounts.sink]
profile = "custom"
host = "127.0.0.1"
port = $3
tls = "none"
auth = "none"

[relay]
state_dir = "$dir/relay-state"
hostname = "relay.bench"
processes = ${RELAY_PROCESSES:-0}
event_loop = "${4:-uvloop}"

[[relay.listeners]]
host = "127.0.0.1"
port = $2
mode = "plain"
# Postfix exempts mynetworks from its 50-connections-per-client limit (anvil); the load
# comes from one address, so the relay's limit (counted over all its processes) is lifted too.
max_connections_per_client = 10000

[[relay.networks]]
cidr = "127.0.0.0/8"

[relay.budget]
messages_per_minute = 100000000
recipients_per_day = 1000000000
connections = 20
EOF
    SERVER_KIND=relay
    SERVER_DIR=$dir
    "$SMTP365" relay --config "$dir/relay.toml" >"$dir/relay.log" 2>&1 &
    SERVER_PID=$!
    "$PY" "$HELPER" wait-smtp --port "$2" --timeout 60 --pid "$SERVER_PID" ||
        die "the relay did not greet: $(tail -5 "$dir/relay.log")"
}

start_baseline() { # DIR PORT
    local dir=$1
    mkdir -p "$dir"
    SERVER_KIND=baseline
    SERVER_DIR=$dir
    "$PY" "$REPO/bench/aiosmtpd_fsync_server.py" --port "$2" --spool "$dir/spool" \
        >"$dir/server.log" 2>&1 &
    SERVER_PID=$!
    "$PY" "$HELPER" wait-smtp --port "$2" --timeout 30 --pid "$SERVER_PID" ||
        die "the aiosmtpd baseline did not greet: $(tail -5 "$dir/server.log")"
}

# ---------------------------------------------------------------------------------------------

SERVERS=(postfix)
SKIPPED=()
if ((RELAY)); then
    if relay_help=$("$SMTP365" relay --help 2>&1); then
        SERVERS+=(relay)
    else
        say "smtp365 relay: SKIPPED, \`$SMTP365 relay --help\` fails:"
        printf "%s\n" "${relay_help:-(no output, exit status non-zero)}" | tail -3 | sed "s/^/    /"
        SKIPPED+=(--skipped relay)
    fi
fi
((RELAY_ASYNCIO)) && [[ " ${SERVERS[*]} " == *" relay "* ]] && SERVERS+=(relay-asyncio)
((BASELINE)) && SERVERS+=(baseline)

say "machine: $(nproc) cores, $(uname -r), work dir $WORK ($(findmnt -no FSTYPE --target "$WORK" 2>/dev/null || stat -f -c %T "$WORK"))"
say "postfix $PFVER from $PFROOT"
"$PY" "$HELPER" cpu-busy --seconds 2
say "servers: ${SERVERS[*]}; N=$N; sessions: $SESSIONS; size $SIZE bytes; reuse=$REUSE"

for s in $SESSIONS; do
    warmup=$((2 * s > 20 ? 2 * s : 20))
    for server in "${SERVERS[@]}"; do
        dir=$WORK/$server-s$s
        mkdir -p "$dir"
        read -r sink_port port < <("$PY" "$HELPER" ports 2)
        sink_log=""
        if [ "$server" != baseline ]; then
            sink_log=$dir/sink.log
            start_sink "$sink_port" "$sink_log"
        fi
        case $server in
        postfix) start_postfix "$dir" "$port" "$sink_port" ;;
        relay) start_relay "$dir" "$port" "$sink_port" ;;
        relay-asyncio) start_relay "$dir" "$port" "$sink_port" asyncio ;;
        baseline) start_baseline "$dir" "$port" ;;
        esac
        args=(--server "$server" --sessions "$s" --n "$N" --size "$SIZE" --port "$port"
            --source "$PFBIN/smtp-source" --root-pid "$SERVER_PID" --warmup "$warmup"
            --timeout "$TIMEOUT" --log "$dir/source.log" --out "$RESULTS")
        ((REUSE)) && args+=(--reuse)
        [ -n "$sink_log" ] && args+=(--sink-log "$sink_log")
        "$PY" "$HELPER" run "${args[@]}" || say "  (run failed; logs in $dir, keep them with --keep)"
        stop_server
        stop_sink
    done
done

[ -n "$OUT" ] && cp "$RESULTS" "$OUT"
"$PY" "$HELPER" table "$RESULTS" "${SKIPPED[@]}"
