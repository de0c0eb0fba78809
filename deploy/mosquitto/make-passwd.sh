#!/bin/sh
# Creates deploy/mosquitto/passwd (Mosquitto's password file) and one password file per user
# in passwords/ (random passwords), each readable only by the one who reads it:
#   passwd          mode 0600, owner BROKER_OWNER (default 1883:1883, the user of the
#                   eclipse-mosquitto image; a broker on the host runs as mosquitto:
#                   BROKER_OWNER=mosquitto:mosquitto)
#   passwords/USER  mode 0600, owner CONTROLLER_OWNER (default 65532:65532, the user of the
#                   pdsno image; for the systemd units: CONTROLLER_OWNER=pdsno:pdsno)
#   passwords/      mode 0700: the compose files mount each controller's own file, not the
#                   directory, so a controller sees its password and no other.
# Setting owners needs root; run as another user, it says which chown to run.
#   deploy/mosquitto/make-passwd.sh global_cntl_1 regional_cntl_zone-A_1 local_cntl_zone-A_1 ops
set -eu
if [ $# -eq 0 ]; then
  echo "usage: $0 USER... (e.g. global_cntl_1 regional_cntl_zone-A_1 local_cntl_zone-A_1 ops)" >&2
  exit 2
fi
if ! command -v mosquitto_passwd >/dev/null; then
  echo "mosquitto_passwd not found: install Mosquitto (Debian/Ubuntu: apt-get install mosquitto)" >&2
  exit 1
fi
for user in "$@"; do
  case $user in
    '' | .* | *[!A-Za-z0-9_.-]*)
      echo "$user: a user name here is 1 or more of [A-Za-z0-9_.-], not starting with '.'" >&2
      exit 2 ;;
  esac
done
broker_owner=${BROKER_OWNER:-1883:1883}
controller_owner=${CONTROLLER_OWNER:-65532:65532}
here=$(cd "$(dirname "$0")" && pwd)
umask 077
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
if [ "$(id -u)" -eq 0 ]; then
  chown "$broker_owner" "$here/passwd"
  for user in "$@"; do
    chown "$controller_owner" "$here/passwords/$user"
  done
  echo "owners: passwd $broker_owner (the broker), passwords/* $controller_owner (the controllers)"
else
  echo "not root: the files are owned by you, so the broker and the controllers cannot read them; as root run:"
  echo "  chown $broker_owner $here/passwd"
  for user in "$@"; do
    echo "  chown $controller_owner $here/passwords/$user"
  done
fi
