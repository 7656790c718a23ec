#!/bin/sh
# The proxy image's entrypoint: mitmdump with the addon in reverse mode on port 8080, the container's
# arguments (mitmproxy's, e.g. --set datalab_pool_size=2) after it. The sign key comes from a file (a
# Docker secret) when DATALAB_SIGN_KEY_FILE names one, so it is never in the service's environment.
set -eu
if [ -n "${DATALAB_SIGN_KEY_FILE:-}" ]; then
  DATALAB_SIGN_KEY=$(cat "$DATALAB_SIGN_KEY_FILE")
  export DATALAB_SIGN_KEY
  unset DATALAB_SIGN_KEY_FILE
fi
exec mitmdump -s /opt/datalab/addon/datalab.py --mode reverse:http://127.0.0.1:1 --listen-port 8080 \
  --set connection_strategy=lazy --set keep_host_header=true "$@"
