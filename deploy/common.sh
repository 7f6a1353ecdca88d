# Settings shared by deploy/up and deploy/down (sourced, not run). Every one can be set in the environment;
# the defaults are the documented scenario.
NODES=${NODES:-3}                       # how many nodes: backend-1 .. backend-$NODES
BASE_PORT=${BASE_PORT:-3001}            # node N publishes its port 3000 on BASE_PORT + N - 1
NETWORK=${NETWORK:-talentnet}           # the user-defined bridge network
IMAGE=${IMAGE:-backend-tn:latest}
NAME_PREFIX=${NAME_PREFIX:-backend-}    # container names: ${NAME_PREFIX}N
SERVICE_NAME=${SERVICE_NAME:-backend-service}  # the shared network alias
DOCKER=${DOCKER:-docker}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }
say() { printf '==> %s\n' "$*" >&2; }

parse_common_option() {  # sets OPTARG_USED=1 when $1 was one of ours
  case $1 in
    -n|--nodes) NODES=$2 ;;
    -p|--base-port) BASE_PORT=$2 ;;
    --network) NETWORK=$2 ;;
    --image) IMAGE=$2 ;;
    --prefix) NAME_PREFIX=$2 ;;
    *) return 1 ;;
  esac
}

check_numbers() {
  [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "NODES must be a whole number >= 1 (got '$NODES')"
  [[ $BASE_PORT =~ ^[1-9][0-9]*$ ]] && ((BASE_PORT + NODES - 1 <= 65535)) \
    || die "BASE_PORT must leave room for $NODES ports below 65536 (got '$BASE_PORT')"
}

engine_answers() { "$DOCKER" info >/dev/null 2>&1; }

# Containers on $NETWORK named ${NAME_PREFIX}K with K > $1 (left over from a larger cluster), one per line.
nodes_above() {
  "$DOCKER" network inspect "$NETWORK" >/dev/null 2>&1 || return 0
  local name
  "$DOCKER" ps -a --filter "network=$NETWORK" --format '{{.Names}}' | while read -r name; do
    if [[ $name =~ ^${NAME_PREFIX}([0-9]+)$ ]] && ((BASH_REMATCH[1] > $1)); then echo "$name"; fi
  done
}

# Stop (SIGTERM: goodbye, exit 0), then remove, the named containers that exist.
stop_and_remove() {
  local present=() name
  for name in "$@"; do
    "$DOCKER" container inspect "$name" >/dev/null 2>&1 && present+=("$name")
  done
  ((${#present[@]})) || return 0
  say "docker stop ${present[*]}"
  "$DOCKER" stop "${present[@]}" >/dev/null
  say "docker rm -v ${present[*]}"
  "$DOCKER" rm -v "${present[@]}" >/dev/null  # -v: anonymous volumes only; a node's named data volume stays
}

# Remove the named data volumes of the given containers (${name}-data) that exist. Their data is gone.
remove_data_volumes() {
  local volumes=() name
  for name in "$@"; do
    "$DOCKER" volume inspect "$name-data" >/dev/null 2>&1 && volumes+=("$name-data")
  done
  ((${#volumes[@]})) || return 0
  say "docker volume rm ${volumes[*]}"
  "$DOCKER" volume rm "${volumes[@]}" >/dev/null
}
