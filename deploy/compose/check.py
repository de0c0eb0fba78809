#!/usr/bin/env python3
"""Checks the compose files where no container engine runs: structure, references and the
rules they must keep. Usage: deploy/compose/check.py [FILE...] (default: every *.yml here).

- every named volume a service mounts is declared, every depends_on target exists;
- every long-running pdsno service has a healthcheck;
- no secret is on a command line (--bootstrap-token, --secret, --user, --reader, --password);
- the global controller's bootstrap secret is mounted only by the global controller and the
  job that mints regional tokens; no controller is given PDSNO_BOOTSTRAP_SECRET_FILE but the
  global one;
- every token file is written by one job and read by one controller;
- every file or directory a pdsno service's command or environment names is on one of its
  mounts (else it would be in the container's own layer: gone with it, unseen by others);
- a controller mounts its own MQTT password file (passwords/USER for --mqtt-username
  USER), never the directory of everyone's;
- a service mounting a mosquitto.conf also mounts the password and ACL files it names;
- a service reading a file a job writes (a token, the GC's bootstrap secret) starts only
  after that job completed (depends_on ... condition: service_completed_successfully, directly
  or through the services it waits for).
The run itself is proven by run-as-processes.py (as root).
"""
import pathlib
import sys

import yaml

SECRET_FLAGS = {"--bootstrap-token", "--secret", "--user", "--reader", "--password"}
# Flags and variables naming files or directories a pdsno service reads or writes.
PATH_FLAGS = ["--bootstrap-token-file", "--mqtt-password-file", "--out", "--data-dir",
              "--bootstrap-secret-file", "--config"]
PATH_VARS = ["PDSNO_BOOTSTRAP_SECRET_FILE", "PDSNO_DATA_DIR", "PDSNO_CONFIG"]
IMAGE_DATA_DIR = "/var/lib/pdsno"


def mounts(svc):
    """(source, target) of each of a service's volumes and bind mounts."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), str(v.get("target", ""))))
        else:
            parts = str(v).split(":")
            out.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
    return out


def mount_of(svc, path):
    """The mount a container path is on (the deepest), or None."""
    best = None
    for src, dst in mounts(svc):
        d = dst.rstrip("/")
        if (path == d or path.startswith(d + "/")) and (best is None or len(d) > len(best[1])):
            best = (src, d)
    return best


def where_in_volume(svc, path):
    """(volume or bind source, path inside it) of a container path, or None."""
    m = mount_of(svc, path)
    return (m[0], path[len(m[1]):].lstrip("/")) if m else None


def env_of(svc):
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env if "=" in e)
    return {k: str(v) for k, v in env.items()}


def deps_of(svc):
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}


def waits_for_completion(services, reader, writer):
    """Whether `reader` starts only after `writer` completed: a depends_on chain whose last
    link to `writer` is service_completed_successfully."""
    seen, todo = set(), [reader]
    while todo:
        name = todo.pop()
        if name in seen or name not in services:
            continue
        seen.add(name)
        for d, cond in deps_of(services[name]).items():
            if d == writer and cond == "service_completed_successfully":
                return True
            todo.append(d)
    return False


def mosquitto_conf_paths(conf):
    out = []
    for line in conf.read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] in ("password_file", "acl_file"):
            out.append((words[0], words[1]))
    return out


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
    # Files and directories each pdsno service names are on its mounts.
    writes, reads = {}, []
    for name, svc in services.items():
        where = f"{path.name}: {name}"
        cmd = [str(c) for c in svc.get("command") or []]
        env = env_of(svc)
        if str(svc.get("image", "")).startswith("pdsno") and cmd:
            named = [(f, arg(cmd, f)) for f in PATH_FLAGS if arg(cmd, f)]
            named += [(k, env[k]) for k in PATH_VARS if k in env]
            if cmd[0] in ("global", "regional", "local") and not arg(cmd, "--data-dir"):
                # The image's PDSNO_DATA_DIR (deploy/container/Containerfile).
                named.append(("the data directory", env.get("PDSNO_DATA_DIR", IMAGE_DATA_DIR)))
            test = [str(t) for t in (svc.get("healthcheck") or {}).get("test") or []]
            if arg(test, "--data-dir"):
                named.append(("the healthcheck's --data-dir", arg(test, "--data-dir")))
            for what, p in named:
                if not p.startswith("/"):
                    errors.append(f"{where}: {what} {p} is not an absolute path")
                elif mount_of(svc, p) is None:
                    errors.append(f"{where}: {what} {p} is on none of its volumes (it would live "
                                  "and die with the container, unseen by the others)")
            user = arg(cmd, "--mqtt-username")
            pw = arg(cmd, "--mqtt-password-file")
            if pw and mount_of(svc, pw) and mount_of(svc, pw)[1] != pw.rstrip("/"):
                errors.append(f"{where}: mount only its own password file at {pw}, not the directory "
                              "of every controller's")
            elif pw and user and mount_of(svc, pw) and pathlib.PurePath(mount_of(svc, pw)[0]).name != user:
                errors.append(f"{where}: {pw} comes from {mount_of(svc, pw)[0]}, which is not the "
                              f"file make-passwd.sh writes for {user} (passwords/{user})")
            # Who writes and who reads the files that pass between services.
            if cmd[0] == "token":
                if arg(cmd, "--out"):
                    writes[where_in_volume(svc, arg(cmd, "--out"))] = name
                if "--init-secret" in cmd and "PDSNO_BOOTSTRAP_SECRET_FILE" in env:
                    writes[where_in_volume(svc, env["PDSNO_BOOTSTRAP_SECRET_FILE"])] = name
            else:
                for p in [arg(cmd, "--bootstrap-token-file"), env.get("PDSNO_BOOTSTRAP_SECRET_FILE")]:
                    if p:
                        reads.append((name, p, where_in_volume(svc, p)))
        for src, _dst in mounts(svc):
            if src.startswith(".") and pathlib.PurePath(src).name == "mosquitto.conf":
                conf = path.parent / src
                for key, p in mosquitto_conf_paths(conf) if conf.exists() else []:
                    if not any(d.rstrip("/") == p for _s, d in mounts(svc)):
                        errors.append(f"{where}: {conf.name} names {key} {p}, which it does not mount")
    for reader, p, loc in reads:
        writer = writes.get(loc)
        if writer and not waits_for_completion(services, reader, writer):
            errors.append(f"{path.name}: {reader} reads {p} before {writer} has written it: make it "
                          f"depend on {writer} with condition: service_completed_successfully "
                          "(directly or through a service that does)")
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
