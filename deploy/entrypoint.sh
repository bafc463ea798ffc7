#!/bin/sh
# The container's entrypoint: check the model repository, then become `plm serve` (exec: it is PID 1 and gets
# SIGTERM directly, so Kubernetes' graceful shutdown reaches the server's drain).
#
#   entrypoint.sh [plm serve flags...]   serve (flags such as --models gpt bert pass through)
#   entrypoint.sh COMMAND [ARGS...]      run anything else instead (`plm client health`, `sh`, ...)
#
# Settings come from PLM_* environment variables (service/config.py reads them) and, when PLM_CONFIG names a
# file, from that TOML file (Kubernetes mounts the ConfigMap's plm.toml there). Precedence: file < env < flags.
set -eu

case "${1:-}" in
  "" | -*) ;;                 # no command, or only flags: serve
  *) exec "$@" ;;
esac

repository="${PLM_REPOSITORY:-/models}"
if [ ! -d "$repository" ]; then
  echo "entrypoint: model repository $repository does not exist; mount one there (docker run -v \"\$PWD/repository:$repository:ro\") or set PLM_REPOSITORY" >&2
  exit 66  # EX_NOINPUT
fi
if ! ls "$repository"/*/manifest.json >/dev/null 2>&1; then
  echo "entrypoint: model repository $repository has no <model>/manifest.json; build one with \`plm build --repository $repository\` or use the image's \`bundled\` target" >&2
  exit 66
fi

if [ -n "${PLM_CONFIG:-}" ]; then
  if [ ! -f "$PLM_CONFIG" ]; then
    echo "entrypoint: PLM_CONFIG=$PLM_CONFIG is not a file" >&2
    exit 66
  fi
  exec plm serve --config "$PLM_CONFIG" "$@"
fi
exec plm serve "$@"
