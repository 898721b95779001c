#!/bin/sh
# Image entrypoint: `docker run IMAGE extract ...` runs `tilefeat extract ...`, while a command
# given as a path or a shell (`/bin/bash -ue .command.sh`, which is how Nextflow starts every
# task; `docker run -it IMAGE bash`) runs as is. Without this, an ENTRYPOINT of plain
# ["tilefeat"] turns Nextflow's task into `tilefeat /bin/bash ...`, and Nextflow can only
# override it through the NXF_CONTAINER_ENTRYPOINT_OVERRIDE environment variable.
case "${1:-}" in
  */* | sh | bash) exec "$@" ;;
  *) exec tilefeat "$@" ;;
esac
