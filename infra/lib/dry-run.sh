# shellcheck shell=bash
# Sourced by infra/gcp/setup.sh and infra/kind/kind.sh: their --dry-run, which prints every
# command (quoted, so it can be pasted) instead of running it. The caller sets DRY_RUN=0 or 1.

# Run a command, or print it in dry-run mode.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Like run, for a command whose output is needed; prints PLACEHOLDER in dry-run mode.
capture() {
  local placeholder=$1
  shift
  if [ "$DRY_RUN" = 1 ]; then
    printf '+' >&2
    printf ' %q' "$@" >&2
    printf '\n' >&2
    printf '%s' "$placeholder"
  else
    "$@"
  fi
}
