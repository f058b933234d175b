#!/bin/sh
# The envoy service's command in docker-compose.yml: puts the control token in
# place and runs Envoy.
#
#   sh compose-entrypoint.sh TEMPLATE OUTPUT COMMAND [ARG...]
#
# The filter reads control.token from its JSON configuration only, so this
# writes a copy of TEMPLATE (envoy/compose.yaml) to OUTPUT, mode 0600, with
# IBEX_CONTROL_TOKEN in place of the placeholder ${IBEX_CONTROL_TOKEN}, then
# execs COMMAND (envoy -c OUTPUT ...) without the token in its environment.
#
# It refuses to start (exit 64) without a token, with one shorter than 32
# characters, or with a character outside A-Z a-z 0-9 . _ ~ + / = - (the
# output of `openssl rand -hex 32` or `openssl rand -base64 33` fits), and
# (exit 65) when TEMPLATE has no placeholder. It never prints the token.
set -eu

if [ "$#" -lt 3 ]; then
    echo "usage: compose-entrypoint.sh TEMPLATE OUTPUT COMMAND [ARG...]" >&2
    exit 64
fi
template=$1
output=$2
shift 2

token=${IBEX_CONTROL_TOKEN:-}
case $token in
    "")
        echo "compose-entrypoint: IBEX_CONTROL_TOKEN is not set (e.g. export IBEX_CONTROL_TOKEN=\$(openssl rand -hex 32))" >&2
        exit 64 ;;
    *[!A-Za-z0-9._~+/=-]*)
        echo "compose-entrypoint: IBEX_CONTROL_TOKEN may only hold A-Z a-z 0-9 . _ ~ + / = -" >&2
        exit 64 ;;
esac
if [ "${#token}" -lt 32 ]; then
    echo "compose-entrypoint: IBEX_CONTROL_TOKEN must be at least 32 characters" >&2
    exit 64
fi
if ! grep -qF '${IBEX_CONTROL_TOKEN}' "$template"; then
    echo "compose-entrypoint: $template has no \${IBEX_CONTROL_TOKEN} placeholder" >&2
    exit 65
fi

umask 077
mkdir -p "$(dirname "$output")"
# The token's characters are none of sed's specials in a replacement (& \ and
# the | delimiter are refused above).
sed 's|[$]{IBEX_CONTROL_TOKEN}|'"$token"'|g' "$template" > "$output.tmp"
mv -f "$output.tmp" "$output"

unset IBEX_CONTROL_TOKEN token
exec "$@"
