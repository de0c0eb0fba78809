#!/usr/bin/env python3
"""Calls a pdsno node's gRPC API from Python with no generated code: the services and
messages are discovered through server reflection. Signs a VALIDATION_REQUEST the way the
.proto documents (HMAC over the canonical JSON of the equivalent envelope) and prints what
came back as JSON lines.

usage: grpc_reflection_client.py HOST:PORT BOOTSTRAP_SECRET
"""
import hashlib
import hmac
import json
import secrets
import sys
import uuid
from datetime import datetime, timezone

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

target, boot = sys.argv[1], sys.argv[2].encode()
ch = grpc.insecure_channel(target)
db = ProtoReflectionDescriptorDatabase(ch)
services = sorted(db.get_services())
print(json.dumps({"services": services}), flush=True)
pool = descriptor_pool.DescriptorPool(db)


def method(service, name):
    svc = pool.FindServiceByName(service)
    m = svc.FindMethodByName(name)
    req_t, resp_t = (message_factory.GetMessageClass(t) for t in (m.input_type, m.output_type))
    call = ch.unary_unary(f"/{svc.full_name}/{m.name}", request_serializer=req_t.SerializeToString,
                          response_deserializer=resp_t.FromString)
    return req_t, call


Check, check = method("grpc.health.v1.Health", "Check")
print(json.dumps({"health": json_format.MessageToDict(check(Check(service=""), timeout=5))}), flush=True)
Info, info = method("pdsno.v1.Node", "GetInfo")
node = json_format.MessageToDict(info(Info(), timeout=5))
print(json.dumps({"info": node}), flush=True)

# A VALIDATION_REQUEST: build the envelope, sign it (admission key = HKDF-SHA256 of the
# token, info "pdsno-admission"), then fill the typed message from it.
temp = "temp-rc-grpc-py-" + secrets.token_hex(3)
token = hmac.new(boot, f"{temp}|zone-A|regional".encode(), hashlib.sha256).hexdigest()
prk = hmac.new(b"\0" * 32, token.encode(), hashlib.sha256).digest()
key = hmac.new(prk, b"pdsno-admission\x01", hashlib.sha256).digest()
now = datetime.now(timezone.utc).isoformat()
payload = {"temp_id": temp, "controller_type": "regional", "region": "zone-A",
           "public_key": "ed25519-pubkey-placeholder", "bootstrap_token": token}
envelope = {"message_id": "msg-" + uuid.uuid4().hex[:12], "message_type": "VALIDATION_REQUEST",
            "sender_id": temp, "recipient_id": node["controllerId"], "timestamp": now,
            "payload": payload, "correlation_id": None, "nonce": secrets.token_hex(32), "signed_at": now}
envelope["signature"] = hmac.new(key, json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode(),
                                 hashlib.sha256).hexdigest()
envelope["signature_algorithm"] = "HMAC-SHA256"

Req, request_validation = method("pdsno.v1.Admission", "RequestValidation")
req = Req()
h = req.header
h.message_id, h.sender_id, h.recipient_id, h.timestamp = (envelope[k] for k in ("message_id", "sender_id", "recipient_id", "timestamp"))
h.nonce, h.signed_at, h.signature, h.signature_algorithm = (envelope[k] for k in ("nonce", "signed_at", "signature", "signature_algorithm"))
for k, v in payload.items():
    setattr(req, k, v)
step = json_format.MessageToDict(request_validation(req, timeout=5))
print(json.dumps({"step": step}), flush=True)

# Tampering is refused with UNAUTHENTICATED.
req.region = "zone-B"
try:
    request_validation(req, timeout=5)
    print(json.dumps({"tampered": "accepted"}), flush=True)
except grpc.RpcError as e:
    print(json.dumps({"tampered": str(e.code()), "details": e.details()}), flush=True)
