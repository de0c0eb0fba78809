#!/bin/sh
# Creates deploy/mosquitto/passwd and one password file per user in passwords/
# (random passwords; the pdsno containers read theirs from passwords/<user>).
#   deploy/mosquitto/make-passwd.sh global_cntl_1 regional_cntl_zone-A_1 local_cntl_zone-A_1 ops
set -eu
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$here/passwords"
chmod 700 "$here/passwords"
: > "$here/passwd"
for user in "$@"; do
  pw=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
  printf '%s' "$pw" > "$here/passwords/$user"
  chmod 600 "$here/passwords/$user"
  mosquitto_passwd -b "$here/passwd" "$user" "$pw"
done
chmod 600 "$here/passwd"
echo "wrote $here/passwd and $here/passwords/ for: $*"
