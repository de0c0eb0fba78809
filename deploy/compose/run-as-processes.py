#!/usr/bin/env python3
"""Runs a compose file's services as processes, the way a container engine would run them,
on a host without one: proves that the deploy files' sequence (jobs, dependencies, users,
paths, file ownership) works as written. Linux, as root (it mounts, and starts each service
as its image's user); needs python3 with PyYAML and util-linux (unshare, nsenter, setpriv).

  deploy/compose/run-as-processes.py [--pdsno target/debug/pdsno] [FILE...]   (default: edge.yml)

Each service runs as its container would:
- image pdsno:*: read from deploy/container/Containerfile (its last stage: USER, ENV,
  ENTRYPOINT, VOLUME, and the directories COPY'd from /rootfs with their --chown owner);
  the binary given with --pdsno stands in for the entrypoint, /usr/local/bin/pdsno.
  image eclipse-mosquitto:*: the host's /usr/sbin/mosquitto with the image's command
  (mosquitto -c /mosquitto/config/mosquitto.conf), started as root; it drops to the image's
  user mosquitto (uid 1883) itself. Other images are refused.
- in its own mount, PID and UTS namespaces (unshare), chrooted into a root that holds the
  host's /usr and /etc read-only (with the image's users in /etc/passwd and /etc/group, and
  every service in /etc/hosts), a private /dev, /proc and /tmp, the image's directories and
  the service's volumes at the paths the compose file names (`:ro` honoured); the command
  runs after the entrypoint, as the image's user (setpriv --reuid --regid --clear-groups),
  with the image's ENV and the service's environment and nothing of the caller's. A small
  init (this script) is PID 1 and forwards signals, as `docker run --init` does.
- named volumes start as empty directories owned root:root 0755, as Docker creates them. A
  volume that is still empty when mounted where the image has a directory takes that
  directory's owner and mode (Docker copies them); mounted anywhere else it keeps its own.
  Relative bind mounts resolve in a copy of deploy/ (the run writes nothing into the
  repository); missing MQTT password files are made in that copy by
  deploy/mosquitto/make-passwd.sh, as root, so with the owners it sets.
- one private network namespace for the whole project (its network): each service name
  resolves to its own loopback address (127.0.0.2, .3, ...). The only change made to a
  command line: a listen address 0.0.0.0:PORT becomes SERVICE_ADDRESS:PORT, so that two
  services can use the same port (each change is printed). `ports:` are not published.

The sequence is `docker compose up`'s: depends_on (service_started, service_healthy,
service_completed_successfully), restart (no, on-failure, unless-stopped, always, with
Docker's back-off: 0.1 s, doubling), and each healthcheck test run in the service's
namespaces as its user, every --health-poll seconds rather than `interval` (to be quick),
failing after start_period + retries x interval. Then it proves, for each file:
  (a) every long-running service becomes healthy (one without a healthcheck: keeps running);
  (b) `pdsno status` in the global controller's container shows the whole tree (the GC, each
      regional controller, each local controller), every controller online;
  (c) after everything is stopped and the bootstrap token files are deleted (they are
      spent), the controllers start again and come back healthy and online, with the same
      ids: admitted controllers need no token;
  (d) every controller's own `pdsno status` says it is connected to its MQTT broker, and an
      external broker's log shows each logging in as its own user, in both runs.
It prints a timeline and exits non-zero with the reason on any failure. Processes, mounts
and files live in namespaces and a tmpfs that end with the run, however it ends (SIGTERM,
SIGINT, SIGHUP, or the end of the process that started it, stop the services first; even
SIGKILL leaves nothing behind).

Not proven here: building the image (the distroless base, the static musl binary), the
container engine itself (its networking, DNS, published ports, cgroup limits, seccomp,
capabilities); every client connection comes from 127.0.0.1 rather than from its own
container's address.
"""

import argparse
import ctypes
import errno
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

NS_MARK = "RUN_AS_PROCESSES_INNER"
WORK = pathlib.Path("/run/pdsno-compose")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HERE = pathlib.Path(__file__).resolve().parent

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


class Failure(Exception):
    """The run failed: the message says why."""


class Interrupted(Exception):
    """A signal asked the run to stop."""


def mount(src, dst, fstype=None, flags=0, data=None):
    def enc(v):
        return None if v is None else str(v).encode()

    if _libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {src} on {dst}: {os.strerror(e)}")


def bind(src, dst, ro=False, rec=False):
    mount(src, dst, None, MS_BIND | (MS_REC if rec else 0))
    if ro:
        mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def die_with_parent():
    """preexec_fn: the child gets SIGKILL when this process ends, however it ends."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# --------------------------------------------------------------------------- images


class Image:
    def __init__(self, name, uid, gid, env, entrypoint, cmd, dirs, volumes, users, files):
        self.name, self.uid, self.gid = name, uid, gid
        self.env, self.entrypoint, self.cmd = env, entrypoint, cmd
        self.dirs = dirs  # container path -> (uid, gid, mode): directories the image has
        self.volumes = volumes  # VOLUME paths: an anonymous volume unless something is mounted
        self.users = users  # [(name, uid, gid, home)]
        self.files = files  # container path -> host file, bound read-only


def pdsno_image(containerfile, binary):
    """The pdsno image, from the Containerfile's last stage."""
    text = re.sub(r"\\\n", " ", containerfile.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    starts = [i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")]
    if not starts:
        raise Failure(f"{containerfile}: no FROM line")
    base = lines[starts[-1]].split()[1]
    uid = gid = 0
    env, entrypoint, cmd, volumes = {}, [], [], []
    dirs = {}
    for ln in lines[starts[-1] + 1 :]:
        word, _, rest = ln.partition(" ")
        word = word.upper()
        if word == "USER":
            u, _, g = rest.strip().partition(":")
            if not u.isdigit() or (g and not g.isdigit()):
                raise Failure(f"{containerfile}: USER {rest} is not numeric (uid:gid)")
            uid, gid = int(u), int(g or u)
        elif word == "ENV":
            for kv in shlex.split(rest):
                k, eq, v = kv.partition("=")
                if not eq:
                    raise Failure(f"{containerfile}: ENV {rest}: use KEY=VALUE")
                env[k] = v
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "CMD":
            cmd = json.loads(rest)
        elif word == "VOLUME":
            volumes += json.loads(rest) if rest.strip().startswith("[") else rest.split()
        elif word == "COPY":
            args = rest.split()
            opts = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}
            paths = [a for a in args if not a.startswith("--")]
            if len(paths) == 2 and paths[0].startswith("/rootfs/"):
                u, _, g = opts.get("--chown", "0:0").partition(":")
                dirs[paths[1].rstrip("/")] = (int(u), int(g or u), 0o755)
    if "nonroot" not in base and uid != 0:
        raise Failure(f"{containerfile}: base image {base}: only distroless ...:nonroot is modelled")
    if not entrypoint:
        raise Failure(f"{containerfile}: no ENTRYPOINT")
    # gcr.io/distroless/static-debian12:nonroot: its users and the nonroot home.
    users = [("root", 0, 0, "/root"), ("nobody", 65534, 65534, "/nonexistent"), ("nonroot", 65532, 65532, "/home/nonroot")]
    dirs.setdefault("/home/nonroot", (65532, 65532, 0o700))
    dirs.setdefault("/tmp", (0, 0, 0o1777))
    return Image("pdsno", uid, gid, env, entrypoint, cmd, dirs, volumes, users, {entrypoint[0]: str(binary)})


def mosquitto_image():
    """eclipse-mosquitto:2 (mosquitto's docker/2.0/Dockerfile), with the host's broker."""
    if not os.access("/usr/sbin/mosquitto", os.X_OK):
        raise Failure("/usr/sbin/mosquitto not found: install mosquitto (apt-get install mosquitto)")
    d = (1883, 1883, 0o755)
    return Image(
        "eclipse-mosquitto", 0, 0, {}, [], ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"],
        {"/mosquitto": d, "/mosquitto/config": d, "/mosquitto/data": d, "/mosquitto/log": d, "/tmp": (0, 0, 0o1777)},
        ["/mosquitto/data", "/mosquitto/log"],
        [("root", 0, 0, "/root"), ("mosquitto", 1883, 1883, "/var/empty")], {},
    )


# --------------------------------------------------------------------------- services


def as_list(v):
    if v is None:
        return []
    if isinstance(v, str):
        return shlex.split(v)
    return [str(x) for x in v]


def duration(v, default):
    if v is None:
        return default
    total, s = 0.0, str(v)
    for num, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)?", s):
        total += float(num) * {"ms": 0.001, "us": 1e-6, "h": 3600, "m": 60, "s": 1, "": 1}[unit]
    return total


class Service:
    def __init__(self, name, cfg, ip, image, project):
        self.name, self.cfg, self.ip, self.image = name, cfg, ip, image
        self.project = project
        self.restart = str(cfg.get("restart", "no"))
        deps = cfg.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        self.deps = {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}
        hc = cfg.get("healthcheck") or {}
        test = hc.get("test")
        if hc.get("disable") or (isinstance(test, list) and test and test[0] == "NONE"):
            test = None
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        self.health = None
        if test:
            argv = test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", " ".join(test[1:])]
            self.health = {
                "argv": [str(a) for a in argv],
                "timeout": duration(hc.get("timeout"), 30),
                "interval": duration(hc.get("interval"), 30),
                "retries": int(hc.get("retries", 3)),
                "start_period": duration(hc.get("start_period"), 0),
            }
        self.long_running = self.health is not None or self.restart in ("always", "unless-stopped")
        entry = as_list(cfg["entrypoint"]) if "entrypoint" in cfg else list(image.entrypoint)
        command = as_list(cfg["command"]) if "command" in cfg else list(image.cmd)
        self.rewrites = []
        argv = []
        for a in entry + command:
            if a.startswith("0.0.0.0:"):
                b = f"{ip}:{a.split(':', 1)[1]}"
                self.rewrites.append(f"{a} -> {b}")
                a = b
            argv.append(a)
        self.command = command
        self.argv = argv
        env = cfg.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, os.environ.get(e, "")) for e in env)
        home = next((u[3] for u in image.users if u[1] == image.uid), "/")
        self.env = {"PATH": DEFAULT_PATH, "HOSTNAME": name, **image.env}
        self.env.update({k: "" if v is None else str(v) for k, v in env.items()})
        self.env.setdefault("HOME", home)
        self.mounts = []  # (host source, container path, ro, named volume or None)
        for v in cfg.get("volumes") or []:
            if isinstance(v, dict):
                src, dst, ro = v.get("source"), v["target"], bool(v.get("read_only"))
            else:
                parts = str(v).split(":")
                src, dst = parts[0], parts[1]
                ro = len(parts) > 2 and "ro" in parts[2].split(",")
            if src.startswith((".", "/")):
                host = (project.compose_dir / src).resolve() if src.startswith(".") else pathlib.Path(src)
                self.mounts.append((host, dst, ro, None))
            else:
                self.mounts.append((project.volume_dir(src), dst, ro, src))
        # The image's VOLUMEs nothing is mounted on: an anonymous volume per container.
        for p in image.volumes:
            if not any(m[1].rstrip("/") == p.rstrip("/") for m in self.mounts):
                anon = f"{name}-anon{p.replace('/', '-')}"
                self.mounts.append((project.volume_dir(anon, anonymous=True), p, False, anon))
        self.root = project.dir / "containers" / name / "root"
        self.log_path = project.dir / "logs" / f"{name}.log"
        # Run state.
        self.proc = None
        self.state = "created"  # created, running, restarting, exited
        self.exit_code = None
        self.started_at = 0.0
        self.first_started = 0.0
        self.restarts = 0
        self.restart_note = ""
        self.backoff = 0.1
        self.restart_at = 0.0
        self.healthy = False
        self.checks = 0
        self.check_proc = None
        self.check_started = 0.0
        self.next_check = 0.0
        self.last_check_output = ""

    def container_path_on_host(self, path):
        """Where a file the container sees at `path` is on the host (in a mount), or None."""
        best = None
        for host, dst, _ro, _vol in self.mounts:
            d = dst.rstrip("/")
            if path == d or path.startswith(d + "/"):
                if best is None or len(d) > len(best[1]):
                    best = (host, d)
        if best is None:
            return None
        rel = path[len(best[1]) :].lstrip("/")
        return best[0] / rel if rel else best[0]


def exit_text(code):
    if code is None:
        return "running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name} ({128 - code})"
    return f"exited {code}"


# --------------------------------------------------------------------------- project


class Project:
    def __init__(self, compose_file, args, t0):
        import yaml

        self.file = compose_file
        self.doc = yaml.safe_load(compose_file.read_text()) or {}
        self.name = self.doc.get("name") or compose_file.stem
        self.dir = WORK / self.name
        self.args = args
        self.t0 = t0
        if self.dir.exists():
            shutil.rmtree(self.dir)
        (self.dir / "logs").mkdir(parents=True)
        # Relative bind mounts resolve in a copy of deploy/, so nothing is written there.
        deploy = compose_file.resolve().parent.parent
        shutil.copytree(
            deploy,
            self.dir / "deploy",
            ignore=shutil.ignore_patterns("passwd", "passwords", "__pycache__", "*.pyc"),
        )
        self.compose_dir = self.dir / "deploy" / compose_file.resolve().parent.name
        services = self.doc.get("services") or {}
        if not services:
            raise Failure(f"{compose_file}: no services")
        if len(services) > 250:
            raise Failure(f"{compose_file}: too many services")
        self.pdsno = pdsno_image(args.containerfile, args.pdsno)
        self.services = {}
        for i, (name, cfg) in enumerate(services.items()):
            image = str(cfg.get("image", ""))
            if image.startswith("pdsno"):
                img = self.pdsno
            elif "eclipse-mosquitto" in image:
                img = mosquitto_image()
            else:
                raise Failure(f"{name}: image {image!r} is not modelled (pdsno or eclipse-mosquitto)")
            self.services[name] = Service(name, cfg, f"127.0.0.{i + 2}", img, self)
        for s in self.services.values():
            for d in s.deps:
                if d not in self.services:
                    raise Failure(f"{s.name}: depends on unknown service {d}")

    def volume_dir(self, name, anonymous=False):
        declared = self.doc.get("volumes") or {}
        if not anonymous and name not in declared:
            raise Failure(f"volume {name} is not declared in {self.file.name}")
        d = self.dir / "volumes" / name
        if not d.exists():
            d.mkdir(parents=True)
            os.chown(d, 0, 0)
            os.chmod(d, 0o755)
        return d

    def say(self, who, what):
        print(f"[{time.monotonic() - self.t0:7.2f}s] {who:<12} {what}", flush=True)

    # ---------------------------------------------------------------- preparation

    def prepare(self):
        print(f"   image {self.pdsno.name}: {self.args.containerfile} (user "
              f"{self.pdsno.uid}:{self.pdsno.gid}, {self.pdsno.entrypoint[0]} = {self.args.pdsno})")
        for s in self.services.values():
            kind = "long-running" if s.long_running else "job"
            print(f"   {s.name:<12} {s.ip:<10} {kind:<12} image {s.image.name} (uid {s.image.uid})")
            for r in s.rewrites:
                print(f"   {'':<12} command line: {r}")
        print("   ports: not published (the services share one private network namespace)")
        self.make_passwords()
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost\n" + "".join(
            f"{s.ip}\t{s.name}\n" for s in self.services.values()
        )
        (self.dir / "hosts").write_text(hosts)

    def make_passwords(self):
        """Runs make-passwd.sh (in the copy of deploy/) when a bind mount needs its output."""
        mosq = self.dir / "deploy" / "mosquitto"
        needed = [
            m[0] for s in self.services.values() for m in s.mounts
            if m[3] is None and not m[0].exists() and mosq in m[0].parents
        ]
        if not needed:
            return
        users = []
        for s in self.services.values():
            cmd = s.command
            if "--mqtt-username" in cmd:
                users.append(cmd[cmd.index("--mqtt-username") + 1])
        users.append("ops")
        script = mosq / "make-passwd.sh"
        out = subprocess.run(["sh", str(script), *users], capture_output=True, text=True)
        if out.returncode != 0:
            raise Failure(f"make-passwd.sh failed ({out.returncode}): {out.stderr.strip()}")
        print(f"   make-passwd.sh {' '.join(users)} (as root):")
        for p in [mosq / "passwd", mosq / "passwords", *sorted((mosq / "passwords").iterdir())]:
            st = p.stat()
            print(f"   {'':<12} {stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid} {p.relative_to(mosq)}")
        missing = [str(p) for p in needed if not p.exists()]
        if missing:
            raise Failure(f"make-passwd.sh did not create {', '.join(missing)}")

    # ---------------------------------------------------------------- containers

    def start(self, s):
        """Starts (or restarts) one service's container."""
        for host, dst, _ro, vol in s.mounts:
            if vol is None:
                if not host.exists():
                    raise Failure(f"{s.name}: bind mount source {host} does not exist")
                continue
            # Docker: an empty volume takes the owner and mode of the image's directory.
            st = host.stat()
            img = s.image.dirs.get(dst.rstrip("/"))
            if not any(host.iterdir()) and img and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != img:
                os.chown(host, img[0], img[1])
                os.chmod(host, img[2])
                self.say(s.name, f"volume {vol} (empty) at {dst}: takes the image's {img[0]}:{img[1]} {img[2]:04o}")
            elif not any(host.iterdir()) and not img and s.state == "created":
                self.say(s.name, f"volume {vol} (empty) at {dst}: not in the image, stays "
                         f"{st.st_uid}:{st.st_gid} {stat.S_IMODE(st.st_mode):04o}")
        s.root.mkdir(parents=True, exist_ok=True)
        spec = {
            "root": str(s.root),
            "hostname": s.name,
            "uid": s.image.uid,
            "gid": s.image.gid,
            "argv": s.argv,
            "env": s.env,
            "hosts": str(self.dir / "hosts"),
            "users": s.image.users,
            "dirs": {k: list(v) for k, v in s.image.dirs.items()},
            "files": s.image.files,
            "mounts": [[str(h), d, ro] for h, d, ro, _v in s.mounts],
        }
        spec_path = self.dir / "containers" / s.name / "spec.json"
        spec_path.write_text(json.dumps(spec))
        log = open(s.log_path, "ab")
        log.write(f"---- start {time.strftime('%H:%M:%S')}: {shlex.join(s.argv)}\n".encode())
        log.flush()
        s.proc = subprocess.Popen(
            ["unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--propagation", "private",
             "--", sys.executable, str(pathlib.Path(__file__).resolve()), "--container-init", str(spec_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", DEFAULT_PATH)}, preexec_fn=die_with_parent,
            start_new_session=True,
        )
        log.close()
        if s.state == "created":
            s.first_started = time.monotonic()
        s.state, s.exit_code, s.started_at = "running", None, time.monotonic()
        s.healthy, s.checks, s.check_proc = False, 0, None
        s.next_check = s.started_at + self.args.health_poll
        self.say(s.name, f"started (pid {s.proc.pid}, {s.ip}){' ' + s.restart_note if s.restarts else ''}")
        s.restart_note = ""

    def started_last_first(self):
        """Services that have run, dependents first (compose stops them in that order)."""
        return sorted((s for s in self.services.values() if s.proc), key=lambda s: s.first_started, reverse=True)

    def init_pid(self, s):
        """The container's init (the child of unshare): the target for signals and nsenter."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if s.proc.poll() is not None:
                return None
            try:
                kids = pathlib.Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split()
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.01)
        return None

    def exec_argv(self, s, argv):
        """A command line run in a running service's namespaces, as its user (docker exec)."""
        pid = self.init_pid(s)
        if pid is None:
            return None
        user = [] if s.image.uid == 0 else [
            "/usr/bin/setpriv", "--reuid", str(s.image.uid), "--regid", str(s.image.gid), "--clear-groups",
            "--pdeathsig", "KILL", "--"]
        return ["nsenter", "--target", str(pid), "--mount", "--uts", "--pid", "--root", "--wd", "--", *user, *argv]

    def exec_in(self, s, argv, timeout=15):
        cmd = self.exec_argv(s, argv)
        if cmd is None:
            raise Failure(f"{s.name} is not running")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=s.env, timeout=timeout,
                               preexec_fn=die_with_parent)
        except subprocess.TimeoutExpired:
            raise Failure(f"{s.name}: {shlex.join(argv)} did not finish within {timeout} s") from None
        return r.returncode, r.stdout, r.stderr

    def stop(self, services, why="stopped"):
        """Stops containers one by one, as `docker compose stop` does: SIGTERM, then SIGKILL
        after 10 s."""
        for s in services:
            if not (s.proc and s.proc.poll() is None):
                continue
            t = time.monotonic()
            pid = self.init_pid(s)
            if pid:
                os.kill(pid, signal.SIGTERM)
            try:
                s.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(s.proc.pid, signal.SIGKILL)
                s.proc.wait()
            self.say(s.name, f"{why}: {exit_text(s.proc.returncode)} ({time.monotonic() - t:.2f} s)")
        for s in services:
            self.kill_check(s)
            if s.state in ("running", "restarting"):
                s.state = "exited"
                s.exit_code = s.proc.returncode if s.proc else None

    def kill_check(self, s):
        if s.check_proc:
            if s.check_proc.poll() is None:
                s.check_proc.kill()
                s.check_proc.wait()
            s.check_proc.stdout.close()
        s.check_proc = None

    def tail(self, s, n=25):
        try:
            lines = s.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return "\n".join(f"    {s.name} | {ln}" for ln in lines)

    # ---------------------------------------------------------------- up

    def up(self, names, done_jobs=()):
        """Starts `names` in dependency order and waits until each job has completed and
        each long-running service is healthy (running, without a healthcheck)."""
        t_start = time.monotonic()
        deadline = t_start + self.args.timeout
        todo = [self.services[n] for n in names]
        for s in todo:
            s.state, s.restarts, s.backoff = "created", 0, 0.1

        def dep_ok(s):
            for d, cond in s.deps.items():
                dep = self.services[d]
                if d in done_jobs:
                    continue
                if cond == "service_completed_successfully":
                    if not (dep.state == "exited" and dep.exit_code == 0):
                        return False
                elif cond == "service_healthy":
                    if not dep.healthy:
                        return False
                elif dep.state not in ("running", "exited") or dep.proc is None:
                    return False
            return True

        def dep_dead(s):
            for d, cond in s.deps.items():
                dep = self.services[d]
                if d in done_jobs or dep not in todo:
                    continue
                if cond == "service_completed_successfully" and dep.state == "exited" and dep.exit_code != 0:
                    return dep
            return None

        while True:
            now = time.monotonic()
            if now > deadline:
                waiting = [f"{s.name} ({self.why_waiting(s, dep_ok)})" for s in todo if not self.settled(s)]
                raise Failure(f"not up within {self.args.timeout:.0f} s: " + ", ".join(waiting))
            for s in todo:
                if s.state == "created":
                    dead = dep_dead(s)
                    if dead:
                        raise Failure(f"{s.name} cannot start: {dead.name} {exit_text(dead.exit_code)}\n"
                                      f"{self.tail(dead)}")
                    if dep_ok(s):
                        self.start(s)
                elif s.state == "restarting" and now >= s.restart_at:
                    self.start(s)
                elif s.state == "running":
                    code = s.proc.poll()
                    if code is not None:
                        self.exited(s, code)
                    elif s.health:
                        self.health_step(s)
            if all(self.settled(s) for s in todo):
                return time.monotonic() - t_start
            time.sleep(0.05)

    def settled(self, s):
        if s.long_running:
            if s.state != "running":
                return False
            return s.healthy if s.health else time.monotonic() - s.started_at >= 1.0
        return s.state == "exited" and s.exit_code == 0

    def why_waiting(self, s, dep_ok):
        if s.state == "created":
            return "waiting for " + ", ".join(f"{d} ({c})" for d, c in s.deps.items()) if not dep_ok(s) else "created"
        if s.state == "running" and s.health and not s.healthy:
            return f"not healthy after {s.checks} checks: {s.last_check_output or 'no output'}"
        return f"{s.state}, {exit_text(s.exit_code)}, {s.restarts} restarts"

    def exited(self, s, code):
        s.exit_code = code
        self.kill_check(s)
        ran = time.monotonic() - s.started_at
        policy = s.restart.split(":")[0]
        max_n = int(s.restart.split(":")[1]) if ":" in s.restart else None
        again = policy in ("always", "unless-stopped") or (policy == "on-failure" and code != 0)
        if again and max_n is not None and s.restarts >= max_n:
            again = False
        if again and s.restarts >= self.args.max_restarts:
            raise Failure(f"{s.name} {exit_text(code)} and was restarted {s.restarts} times "
                          f"(restart: {s.restart}); its log ends:\n{self.tail(s)}")
        if again:
            if ran >= 10:
                s.backoff = 0.1
            s.restart_at = time.monotonic() + s.backoff
            s.restart_note = f"(restart {s.restarts + 1}, restart: {s.restart})"
            self.say(s.name, f"{exit_text(code)} after {ran:.2f} s; restarting in {s.backoff:.1f} s "
                     f"(restart: {s.restart}): {self.last_line(s)}")
            s.restarts += 1
            s.backoff = min(s.backoff * 2, 60)
            s.state = "restarting"
            return
        s.state = "exited"
        self.say(s.name, f"{exit_text(code)} after {ran:.2f} s")
        if s.long_running or code != 0:
            raise Failure(f"{s.name} {exit_text(code)} (restart: {s.restart}); its log ends:\n{self.tail(s)}")

    def last_line(self, s):
        lines = [ln for ln in self.tail(s, 5).splitlines() if not ln.strip().endswith("|")]
        return lines[-1].split("| ", 1)[-1].strip() if lines else ""

    def health_step(self, s):
        h, now = s.health, time.monotonic()
        if s.check_proc is not None:
            code = s.check_proc.poll()
            if code is None and now - s.check_started > h["timeout"]:
                self.kill_check(s)
                s.last_check_output = f"timed out after {h['timeout']:.0f} s"
                code = -1
            elif code is not None:
                out = s.check_proc.stdout.read()
                s.check_proc.stdout.close()
                s.check_proc = None
                s.last_check_output = " ".join(out.split())[-300:]
            if code is not None:
                s.checks += 1
                if code == 0 and not s.healthy:
                    s.healthy = True
                    self.say(s.name, f"healthy after {now - s.started_at:.2f} s (check {s.checks})")
                elif code != 0 and s.healthy:
                    s.healthy = False
                    self.say(s.name, f"unhealthy: {s.last_check_output}")
                s.next_check = now + self.args.health_poll
        elif now >= s.next_check:
            limit = h["start_period"] + h["retries"] * h["interval"]
            if not s.healthy and now - s.started_at > limit:
                raise Failure(f"{s.name} not healthy within start_period + retries x interval = {limit:.0f} s "
                              f"({s.checks} checks; last: {s.last_check_output}); its log ends:\n{self.tail(s)}")
            cmd = self.exec_argv(s, h["argv"])
            if cmd is None:
                return
            s.check_proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, env=s.env,
                                            preexec_fn=die_with_parent)
            s.check_started = now

    # ---------------------------------------------------------------- proofs

    def still_running(self, label):
        """Every long-running service is still running (none died after becoming healthy)."""
        dead = [s for s in self.services.values() if s.long_running and (s.proc is None or s.proc.poll() is not None)]
        if dead:
            raise Failure(f"{label}: {', '.join(f'{s.name} {exit_text(s.proc.poll())}' for s in dead)}:\n"
                          + "\n".join(self.tail(s) for s in dead))

    def controllers(self):
        by_tier = {}
        for s in self.services.values():
            if s.image is self.pdsno and s.command and s.command[0] in ("global", "regional", "local"):
                by_tier.setdefault(s.command[0], []).append(s)
        if len(by_tier.get("global", [])) != 1:
            raise Failure("the status check needs exactly one global controller service")
        return by_tier

    def check_tree(self, label):
        """(b): `pdsno status` in the GC's container: the whole tree, every controller online."""
        tiers = self.controllers()
        gc = tiers["global"][0]
        want_rc, want_lc = len(tiers.get("regional", [])), len(tiers.get("local", []))
        argv = [gc.image.entrypoint[0], "status", "--data-dir", gc.env.get("PDSNO_DATA_DIR", "/var/lib/pdsno")]
        t_start = time.monotonic()
        deadline = t_start + self.args.timeout
        problem = shown = ""
        while time.monotonic() < deadline:
            if problem != shown:
                self.say(gc.name, f"{label}: pdsno status: {problem}")
                shown = problem
            code, out, err = self.exec_in(gc, argv + ["--json"])
            if code == 0:
                try:
                    st = json.loads(out)
                except ValueError:
                    st = {}
                problem, ids = self.tree_problem(st, want_rc, want_lc)
                if not problem:
                    _c, text, _e = self.exec_in(gc, argv)
                    self.say(gc.name, f"{label}: pdsno status shows the GC, {want_rc} regional and "
                             f"{want_lc} local controllers, all online ({time.monotonic() - t_start:.2f} s)")
                    for ln in text.rstrip().splitlines():
                        print(f"    {ln}")
                    return ids
            else:
                problem = (err or out).strip()
            time.sleep(0.5)
        raise Failure(f"{label}: pdsno status in {gc.name} never showed the whole tree online: {problem}")

    @staticmethod
    def tree_problem(st, want_rc, want_lc):
        if st.get("role") != "global":
            return f"role {st.get('role')!r}", None
        rcs = st.get("children") or []
        lcs = [g for c in rcs for g in (c.get("children") or [])]
        ids = [st.get("controller_id")] + [c.get("controller_id") for c in rcs + lcs]
        if len(rcs) != want_rc or len(lcs) != want_lc:
            return f"{len(rcs)} regional and {len(lcs)} local controllers", ids
        off = [f"{c.get('controller_id')} {c.get('liveness')}" for c in rcs + lcs if c.get("liveness") != "online"]
        if off:
            return "not online: " + ", ".join(off), ids
        return "", ids

    def token_files(self):
        """The token files the jobs write, as (job, container path, host path)."""
        out = []
        for s in self.services.values():
            if s.command and s.command[0] == "token" and "--out" in s.command:
                p = s.command[s.command.index("--out") + 1]
                out.append((s, p, s.container_path_on_host(p)))
        return out

    def check_mqtt(self, label):
        """(d): each controller's own `pdsno status` says it is connected to its broker."""
        ctl = [s for tier in self.controllers().values() for s in tier]
        t_start = time.monotonic()
        pending, why = {s.name: s for s in ctl}, {}
        while pending and time.monotonic() < t_start + self.args.timeout:
            for s in list(pending.values()):
                data = s.env.get("PDSNO_DATA_DIR", "/var/lib/pdsno")
                code, out, err = self.exec_in(s, [s.image.entrypoint[0], "status", "--data-dir", data, "--json"])
                try:
                    transport = json.loads(out).get("transport") or {} if code == 0 else {}
                except ValueError:
                    transport = {}
                if transport.get("mqtt_connected") is True:
                    del pending[s.name]
                else:
                    why[s.name] = (err or "").strip() or f"transport {json.dumps(transport)}"
            if pending:
                time.sleep(0.3)
        if pending:
            raise Failure(f"{label}: not connected to MQTT: " + "; ".join(f"{n}: {why.get(n)}" for n in pending))
        broker = ", ".join(sorted({self.broker_of(s) for s in ctl}))
        self.say("", f"{label}: every controller's own pdsno status says mqtt connected (broker {broker}; "
                 f"{time.monotonic() - t_start:.2f} s)")

    def broker_of(self, s):
        url = s.env.get("PDSNO_MQTT_URL")
        if url:
            return url
        gc = self.controllers()["global"][0]
        cmd = gc.command
        return cmd[cmd.index("--advertise-mqtt") + 1] if "--advertise-mqtt" in cmd else "embedded"

    def check_broker_log(self):
        """(d), external broker: it logged each controller in as its own user, in the first
        run and in the run after the restart (its log is complete once it has stopped)."""
        brokers = [s for s in self.services.values() if s.image.name == "eclipse-mosquitto"]
        if not brokers:
            return
        b = brokers[0]
        runs = [r for r in b.log_path.read_text(errors="replace").split("---- start")[1:] if " running" in r]
        users = [s.command[s.command.index("--mqtt-username") + 1]
                 for s in self.services.values() if "--mqtt-username" in s.command]
        if len(runs) < 2:
            raise Failure(f"{b.name}: expected two runs in its log, found {len(runs)}:\n{self.tail(b)}")
        for i, run in ((1, runs[0]), (2, runs[-1])):
            missing = [u for u in users if f"u'{u}'" not in run]
            if missing:
                raise Failure(f"{b.name} (run {i}) never logged in {', '.join(missing)}:\n{self.tail(b)}")
        denied = sum(run.count("not authorised") + run.count("Denied") for run in runs)
        self.say(b.name, f"(d) its log: {', '.join(users)} logged in with their own user names and passwords, "
                 f"in both runs; {denied} refusals")


# --------------------------------------------------------------------------- run


def run_file(compose_file, args):
    t0 = time.monotonic()
    print(f"== {compose_file.name}", flush=True)
    p = Project(compose_file, args, t0)
    try:
        p.prepare()
        names = list(p.services)
        print("-- up (as docker compose up)")
        t_up = p.up(names)
        long_running = [s.name for s in p.services.values() if s.long_running]
        p.say("", f"(a) up in {t_up:.2f} s: {', '.join(long_running)} healthy or running; jobs completed")
        restarts = {s.name: s.restarts for s in p.services.values() if s.restarts}
        if restarts:
            p.say("", "restarts: " + ", ".join(f"{k} {v}" for k, v in restarts.items()))
        p.check_mqtt("(d)")
        ids = p.check_tree("(b)")
        p.still_running("(b)")
        print("-- stop, delete the spent token files, start the controllers again")
        p.stop(p.started_last_first())
        for job, path, host in p.token_files():
            if host is None or not host.exists():
                raise Failure(f"{job.name} wrote {path}, which is not in any of its volumes")
            host.unlink()
            p.say(job.name, f"deleted {path}")
        jobs = [s.name for s in p.services.values() if not s.long_running]
        t_again = p.up(long_running, done_jobs=jobs)
        left = [path for _j, path, host in p.token_files() if host.exists()]
        if left:
            raise Failure(f"token files came back: {', '.join(left)}")
        p.say("", f"(c) controllers healthy again in {t_again:.2f} s without token files")
        ids_again = p.check_tree("(c)")
        if ids_again != ids:
            raise Failure(f"(c) the controllers came back with other ids: {ids} before, {ids_again} after")
        p.check_mqtt("(d)")
        p.still_running("(c)")
        print("-- down")
        p.stop(p.started_last_first(), "down")
        p.check_broker_log()
        print(f"== {compose_file.name} OK in {time.monotonic() - t0:.1f} s "
              f"(up {t_up:.1f} s, restart without tokens {t_again:.1f} s)", flush=True)
    finally:
        p.stop(p.started_last_first(), "cleanup")
        if args.logs:
            save_logs(p, args.logs)
        shutil.rmtree(p.dir, ignore_errors=True)


def save_logs(p, dest):
    d = pathlib.Path(dest) / p.name
    d.mkdir(parents=True, exist_ok=True)
    for f in (p.dir / "logs").glob("*.log"):
        shutil.copy(f, d / f.name)


def inner(args):
    """In the run's own mount and network namespaces."""
    # The project network: loopback only, up (SIOCGIFFLAGS, SIOCSIFFLAGS with IFF_UP).
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = struct.unpack("16sH", fcntl.ioctl(sock, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
        fcntl.ioctl(sock, 0x8914, struct.pack("16sH", b"lo", flags | 1))
    # Everything the run creates lives in this tmpfs, gone when the namespace is.
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    WORK.mkdir()
    for f in args.files:
        run_file(f, args)


def preflight(args):
    if os.geteuid() != 0:
        raise Failure("run it as root: it mounts, and starts each service as its image's user "
                      "(sudo deploy/compose/run-as-processes.py ...)")
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            raise Failure(f"{tool} not found: install util-linux (apt-get install util-linux)")
    if not os.access("/usr/bin/setpriv", os.X_OK):
        raise Failure("/usr/bin/setpriv not found: install util-linux")
    try:
        import yaml  # noqa: F401
    except ImportError:
        raise Failure("PyYAML is missing: python3 -m pip install pyyaml (or apt-get install python3-yaml)") from None
    if not (args.pdsno.is_file() and os.access(args.pdsno, os.X_OK)):
        raise Failure(f"no pdsno binary at {args.pdsno}: cargo build -p pdsno-node --bin pdsno, or give --pdsno PATH")
    for p in [args.pdsno, args.containerfile, *args.files]:
        if p == pathlib.Path("/run") or pathlib.Path("/run") in p.parents:
            raise Failure(f"{p} is under /run, which the run replaces with its own tmpfs: use another path")
    for f in args.files:
        if not f.is_file():
            raise Failure(f"no compose file {f}")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=pathlib.Path, help="compose files (default: edge.yml)")
    ap.add_argument("--pdsno", type=pathlib.Path, default=HERE.parent.parent / "target" / "debug" / "pdsno",
                    help="the pdsno binary standing in for the image's (default: target/debug/pdsno)")
    ap.add_argument("--containerfile", type=pathlib.Path, default=HERE.parent / "container" / "Containerfile")
    ap.add_argument("--timeout", type=float, default=90, help="seconds each phase may take (default 90)")
    ap.add_argument("--health-poll", type=float, default=0.5, help="seconds between health checks (default 0.5)")
    ap.add_argument("--max-restarts", type=int, default=8,
                    help="restarts of one service before the run fails (default 8: 25 s of back-off)")
    ap.add_argument("--logs", type=pathlib.Path, help="copy the services' logs into this directory")
    a = ap.parse_args(argv)
    a.files = [f.resolve() for f in (a.files or [HERE / "edge.yml"])]
    a.pdsno = a.pdsno.resolve()
    a.containerfile = a.containerfile.resolve()
    if a.logs:
        a.logs = a.logs.resolve()
    return a


def main(argv):
    if argv[:1] == ["--container-init"]:
        return container_init(argv[1])
    try:
        args = parse_args(argv)
        if os.environ.get(NS_MARK) != "1":
            preflight(args)
            # Re-run in a private mount and network namespace (the same process: unshare execs).
            os.environ[NS_MARK] = "1"
            os.execvp("unshare", ["unshare", "--mount", "--net", "--propagation", "private", "--",
                                  sys.executable, str(pathlib.Path(__file__).resolve()), *argv])

        def stop_on(signum, _frame):
            raise Interrupted(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, stop_on)
        # Stop (cleaning up) when whoever started the run goes away, e.g. a killed CI job.
        parent = os.getppid()
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            raise Interrupted(signal.SIGTERM)
        t0 = time.monotonic()
        inner(args)
        print(f"all OK in {time.monotonic() - t0:.1f} s: {' '.join(f.name for f in args.files)}")
        return 0
    except Failure as e:
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as e:
        signum = e.args[0]
        print(f"interrupted ({signal.Signals(signum).name}): services stopped", file=sys.stderr, flush=True)
        return 128 + signum


# --------------------------------------------------------------------------- container init


def container_init(spec_path):
    """PID 1 of one service's container: builds its root, then runs the service in it and
    passes signals on. Runs in new mount, PID and UTS namespaces (unshare), as root."""
    spec = json.loads(pathlib.Path(spec_path).read_text())
    root = pathlib.Path(spec["root"])
    try:
        build_root(spec, root)
        import socket

        socket.sethostname(spec["hostname"])
        os.chroot(root)
        os.chdir("/")
    except OSError as e:
        print(f"container setup failed: {e}", file=sys.stderr, flush=True)
        return 125
    argv = spec["argv"]
    if spec["uid"] != 0:
        argv = ["/usr/bin/setpriv", "--reuid", str(spec["uid"]), "--regid", str(spec["gid"]),
                "--clear-groups", "--", *argv]
    child = os.fork()
    if child == 0:
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvpe(argv[0], argv, spec["env"])
        except OSError as e:
            print(f"exec {argv[0]}: {e}", file=sys.stderr, flush=True)
            os._exit(127)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda s, _f: os.kill(child, s))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        if pid == child:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def build_root(spec, root):
    def under(p):
        return root / str(p).lstrip("/")

    def mkdirs(p, uid=0, gid=0, mode=0o755):
        p = under(p)
        if not p.exists():
            p.mkdir(parents=True, exist_ok=True)
            os.chown(p, uid, gid)
            os.chmod(p, mode)
        return p

    def touch(p):
        p = under(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            p.touch()
        return p

    mounted = {d.rstrip("/") for _h, d, _ro in spec["mounts"]}
    # The host's /usr (but /usr/local) and the top-level links into it, read-only.
    mkdirs("/usr")
    def mirror(src, dst):
        """The host's `src` at `dst`: the same link, or the directory bound read-only."""
        if src.is_symlink():
            if not dst.is_symlink():
                dst.symlink_to(os.readlink(src))
        elif src.is_dir():
            dst.mkdir(exist_ok=True)
            bind(src, dst, ro=True)

    for name in sorted(os.listdir("/usr")):
        if name != "local":
            mirror(pathlib.Path("/usr") / name, under(f"/usr/{name}"))
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        mirror(pathlib.Path("/") / name, under(name))
    mkdirs("/usr/local/bin")
    # /etc: the host's, read-only, but the image's users, and the project's hosts.
    own = {"passwd", "group", "hosts", "hostname", "shadow", "gshadow"}
    etc = mkdirs("/etc")
    for name in sorted(os.listdir("/etc")):
        if name in own:
            continue
        src, dst = pathlib.Path("/etc") / name, etc / name
        if src.is_symlink():
            if not dst.is_symlink() and not dst.exists():
                dst.symlink_to(os.readlink(src))
        elif src.is_dir():
            dst.mkdir(exist_ok=True)
            bind(src, dst, ro=True)
        elif src.is_file():
            if not dst.exists():
                dst.touch()
            bind(src, dst, ro=True)
    (etc / "passwd").write_text("".join(f"{n}:x:{u}:{g}:{n}:{h}:/sbin/nologin\n" for n, u, g, h in spec["users"]))
    (etc / "group").write_text("".join(f"{n}:x:{g}:\n" for n, _u, g, _h in spec["users"]))
    (etc / "hostname").write_text(spec["hostname"] + "\n")
    shutil.copyfile(spec["hosts"], etc / "hosts")
    # A private /dev and /proc; /tmp is the container's own.
    dev = mkdirs("/dev")
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=0755")
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        (dev / name).touch()
        bind(f"/dev/{name}", dev / name)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        (dev / name).symlink_to(target)
    (dev / "shm").mkdir()
    mount("tmpfs", dev / "shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    proc = mkdirs("/proc", mode=0o555)
    try:
        mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
        bind("/proc", proc, rec=True)
    # The image's directories (where nothing is mounted) and files.
    for path, (uid, gid, mode) in spec["dirs"].items():
        if path not in mounted:
            mkdirs(path, uid, gid, mode)
    for path, host in spec["files"].items():
        bind(host, touch(path), ro=True)
    # The service's volumes and bind mounts.
    for host, dst, ro in spec["mounts"]:
        target = mkdirs(dst) if os.path.isdir(host) else touch(dst)
        bind(host, target, ro=ro)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
