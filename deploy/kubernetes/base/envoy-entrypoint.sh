#!/bin/sh
# The envoy service's command in docker-compose.yml: puts the control token and
# the REST front's token in place and runs Envoy.
#
#   sh compose-entrypoint.sh TEMPLATE OUTPUT COMMAND [ARG...]
#
# The filter reads control.token and redis.token from its JSON configuration
# only, so this writes a copy of TEMPLATE (envoy/compose.yaml) to OUTPUT, mode
# 0600, with IBEX_CONTROL_TOKEN in place of the placeholder ${IBEX_CONTROL_TOKEN}
# and IBEX_REDIS_REST_TOKEN in place of ${IBEX_REDIS_REST_TOKEN}, then execs
# COMMAND (envoy -c OUTPUT ...) without either token in its environment.
#
# It refuses to start (exit 64) without a token, with one shorter than 32
# characters, or with a character outside A-Z a-z 0-9 . _ ~ + / = - (the
# output of `openssl rand -hex 32` or `openssl rand -base64 33` fits), and
# (exit 65) when TEMPLATE lacks a placeholder. It never prints a token.
set -eu

if [ "$#" -lt 3 ]; then
    echo "usage: compose-entrypoint.sh TEMPLATE OUTPUT COMMAND [ARG...]" >&2
    exit 64
fi
template=$1
output=$2
shift 2

# check NAME VALUE: refuse an unusable token (never printing it)
check() {
    case $2 in
        "")
            echo "compose-entrypoint: $1 is not set (e.g. export $1=\$(openssl rand -hex 32))" >&2
            exit 64 ;;
        *[!A-Za-z0-9._~+/=-]*)
            echo "compose-entrypoint: $1 may only hold A-Z a-z 0-9 . _ ~ + / = -" >&2
            exit 64 ;;
    esac
    if [ "${#2}" -lt 32 ]; then
        echo "compose-entrypoint: $1 must be at least 32 characters" >&2
        exit 64
    fi
    if ! grep -qF "\${$1}" "$template"; then
        echo "compose-entrypoint: $template has no \${$1} placeholder" >&2
        exit 65
    fi
}

control_token=${IBEX_CONTROL_TOKEN:-}
rest_token=${IBEX_REDIS_REST_TOKEN:-}
check IBEX_CONTROL_TOKEN "$control_token"
check IBEX_REDIS_REST_TOKEN "$rest_token"

umask 077
mkdir -p "$(dirname "$output")"
# The tokens' characters are none of sed's specials in a replacement (& \ and
# the | delimiter are refused above).
sed -e 's|[$]{IBEX_CONTROL_TOKEN}|'"$control_token"'|g' \
    -e 's|[$]{IBEX_REDIS_REST_TOKEN}|'"$rest_token"'|g' "$template" > "$output.tmp"
mv -f "$output.tmp" "$output"

unset IBEX_CONTROL_TOKEN IBEX_REDIS_REST_TOKEN control_token rest_token
exec "$@"
