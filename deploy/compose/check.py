#!/usr/bin/env python3
"""Checks the compose files where no container engine runs: structure, references and the
rules they must keep. Usage: deploy/compose/check.py [FILE...] (default: every *.yml here).

- every named volume a service mounts is declared, every depends_on target exists;
- every long-running pdsno service has a healthcheck;
- no secret is on a command line (--bootstrap-token, --secret, --user, --reader, --password);
- the global controller's bootstrap secret is mounted only by the global controller and the
  job that mints regional tokens; no controller is given PDSNO_BOOTSTRAP_SECRET_FILE but the
  global one;
- every token file is written by one job and read by one controller.
"""
import pathlib
import sys

import yaml

SECRET_FLAGS = {"--bootstrap-token", "--secret", "--user", "--reader", "--password"}


def arg(cmd, flag):
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def check(path):
    errors = []
    doc = yaml.safe_load(path.read_text())
    services = doc.get("services") or {}
    volumes = set((doc.get("volumes") or {}).keys())
    written, read = {}, {}
    for name, svc in services.items():
        where = f"{path.name}: {name}"
        for v in svc.get("volumes") or []:
            src = v.split(":", 1)[0]
            if not src.startswith((".", "/")) and src not in volumes:
                errors.append(f"{where}: volume {src!r} is not declared")
        deps = svc.get("depends_on") or []
        for d in deps if isinstance(deps, list) else deps.keys():
            if d not in services:
                errors.append(f"{where}: depends on unknown service {d!r}")
        cmd = [str(c) for c in svc.get("command") or []]
        image = str(svc.get("image", ""))
        if not image.startswith("pdsno") or not cmd:
            continue
        for c in cmd:
            if c in SECRET_FLAGS:
                errors.append(f"{where}: {c} puts a secret on the command line")
        env = svc.get("environment") or {}
        tier = cmd[0]
        if tier in ("global", "regional", "local", "broker"):
            if "healthcheck" not in svc:
                errors.append(f"{where}: a long-running service needs a healthcheck")
            if tier != "global" and "PDSNO_BOOTSTRAP_SECRET_FILE" in env:
                errors.append(f"{where}: only the global controller holds the bootstrap secret")
            tf = arg(cmd, "--bootstrap-token-file")
            if tf:
                read.setdefault(tf, []).append(name)
        if tier == "token":
            out = arg(cmd, "--out")
            if out:
                written.setdefault(out, []).append(name)
        mounts_gc_secret = any(
            str(v).split(":", 1)[0] == "gc-secret" for v in svc.get("volumes") or []
        )
        kind = arg(cmd, "--type")
        if mounts_gc_secret and not (tier == "global" or (tier == "token" and kind == "regional")):
            errors.append(f"{where}: sees the global controller's bootstrap secret")
    for f, who in written.items():
        if len(who) != 1:
            errors.append(f"{path.name}: token file {f} written by {who}")
        if len(read.get(f, [])) != 1:
            errors.append(f"{path.name}: token file {f} read by {read.get(f, [])}")
    for f, who in read.items():
        if f not in written:
            errors.append(f"{path.name}: {who} read {f}, which no job writes")
    return errors


def main(argv):
    here = pathlib.Path(__file__).resolve().parent
    files = [pathlib.Path(a) for a in argv] or sorted(here.glob("*.yml"))
    errors = [e for f in files for e in check(f)]
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        return 1
    print(f"compose files OK: {' '.join(f.name for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
