#!/bin/sh
# Start a container only if its secrets are real: refuse empty values and the
# placeholders .env.example ships (anything containing "change-me").
#
#   refuse-placeholders.sh VAR [VAR...] -- COMMAND [ARGS...]
#
# Used as the entrypoint of compose's redis and grafana services, so a copied
# .env.example cannot start them with a password anybody can read.
set -eu
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    name="$1"
    shift
    eval "value=\${$name:-}"
    case "$value" in
        "")
            echo "refusing to start: $name is empty; set it in .env (openssl rand -hex 32)" >&2
            exit 64
            ;;
        *[Cc][Hh][Aa][Nn][Gg][Ee]-[Mm][Ee]*)
            echo "refusing to start: $name is still the placeholder from .env.example; set a real secret in .env" >&2
            exit 64
            ;;
    esac
done
if [ "$#" -eq 0 ]; then
    echo "usage: refuse-placeholders.sh VAR [VAR...] -- COMMAND [ARGS...]" >&2
    exit 64
fi
shift
exec "$@"
