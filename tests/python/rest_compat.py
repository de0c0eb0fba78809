#!/usr/bin/env python3
"""REST compatibility probe, written like the original Python PDSNO client: stdlib json,
hmac and http.client only (no pdsno code). Prints one JSON line per case:
{"case": ..., "status": <http status>, "body": <parsed body>, "reply_verifies": bool|null}.

usage: rest_compat.py HOST:PORT SIGNING_SECRET BOOTSTRAP_SECRET
"""
import hashlib
import hmac
import http.client
import json
import secrets
import sys
import uuid
from datetime import datetime, timezone

host, port = sys.argv[1].rsplit(":", 1)
KEY = hashlib.sha256(sys.argv[2].encode()).digest()
BOOT = sys.argv[3].encode()


def now():
    return datetime.now(timezone.utc).isoformat()


def canon(m):
    return json.dumps(m, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign(m):
    m["nonce"] = secrets.token_hex(32)
    m["signed_at"] = now()
    m["signature"] = hmac.new(KEY, canon(m), hashlib.sha256).hexdigest()
    m["signature_algorithm"] = "HMAC-SHA256"
    return m


def verifies(m):
    if not isinstance(m, dict) or "signature" not in m:
        return None
    c = {k: v for k, v in m.items() if k not in ("signature", "signature_algorithm")}
    return hmac.compare_digest(hmac.new(KEY, canon(c), hashlib.sha256).hexdigest(), m["signature"])


def env(mtype, sender, recipient, payload, corr=None):
    return {"message_id": "msg-" + uuid.uuid4().hex[:12], "message_type": mtype, "sender_id": sender,
            "recipient_id": recipient, "timestamp": now(), "payload": payload, "correlation_id": corr}


conn = http.client.HTTPConnection(host, int(port), timeout=10)


def call(method, path, body=None, raw=None):
    global conn
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
    except (http.client.HTTPException, OSError):
        # The server may close a connection after refusing a request (413): reconnect.
        conn.close()
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
    text = r.read()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text.decode("utf-8", "replace")
    return r.status, parsed


def report(case, status, body):
    print(json.dumps({"case": case, "status": status, "body": body, "reply_verifies": verifies(body)}), flush=True)


report("health", *call("GET", "/health"))
report("info", *call("GET", "/info"))

temp = "temp-rc-py-" + secrets.token_hex(3)
token = hmac.new(BOOT, f"{temp}|zone-A|regional".encode(), hashlib.sha256).hexdigest()
payload = {"temp_id": temp, "controller_type": "regional", "region": "zone-A",
           "public_key": "ed25519-pubkey-placeholder", "bootstrap_token": token,
           "metadata": {"hostname": "rc-Z\u00fcrich-\U0001F600", "ip_address": "10.0.0.1", "software_version": "0.1.0",
                        "capabilities": ["discovery", "approval", "policy_enforcement"],
                        "load": 0.25, "ratio": 1e-05, "big": 12345678901234567890}}
req = sign(env("VALIDATION_REQUEST", temp, "global_cntl_1", payload))
status, ch = call("POST", "/message/validation_request", req)
report("validation_request", status, ch)
if status == 200 and isinstance(ch, dict) and ch.get("message_type") == "CHALLENGE":
    p = ch["payload"]
    sn = hmac.new(bytes.fromhex(p["nonce"]), b"signed_by_controller", hashlib.sha256).hexdigest()
    resp = sign(env("CHALLENGE_RESPONSE", temp, "global_cntl_1",
                    {"challenge_id": p["challenge_id"], "temp_id": temp, "signed_nonce": sn}, corr=ch["message_id"]))
    report("challenge_response", *call("POST", "/message/challenge_response", resp))

# The exact same request again: a replay.
report("replay", *call("POST", "/message/validation_request", req))

unsigned = env("VALIDATION_REQUEST", temp, "global_cntl_1", payload)
report("unsigned", *call("POST", "/message/validation_request", unsigned))

tampered = sign(env("VALIDATION_REQUEST", temp, "global_cntl_1", payload))
tampered["payload"]["region"] = "zone-B"
report("tampered", *call("POST", "/message/validation_request", tampered))

wrong = sign(env("VALIDATION_REQUEST", temp, "regional_cntl_zone-A_9", payload))
report("wrong_recipient", *call("POST", "/message/validation_request", wrong))

mismatch = sign(env("VALIDATION_REQUEST", temp, "global_cntl_1", payload))
report("path_type_mismatch", *call("POST", "/message/challenge_response", mismatch))

report("malformed_json", *call("POST", "/message/validation_request", raw=b"{\"message_id\": "))
report("not_an_envelope", *call("POST", "/message/validation_request", body={"hello": "world"}))
report("invalid_utf8", *call("POST", "/message/validation_request", raw=b"{\"a\":\"\xff\"}"))
report("huge_body", *call("POST", "/message/validation_request", raw=b"{\"pad\":\"" + b"x" * (2 * 1024 * 1024) + b"\"}"))
report("unknown_type", *call("POST", "/message/no_such_type", req))
report("unhandled_type", *call("POST", "/message/discovery_report", sign(env("DISCOVERY_REPORT", temp, "global_cntl_1", {}))))
