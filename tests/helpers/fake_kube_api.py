#!/usr/bin/env python3
"""A small stand-in for the Kubernetes API server, for the auditor's integration tests.

Serves `list` and `watch` of pods (GET /api/v1/pods, with a `spec.nodeName=` field
selector) and of a namespace's Secrets (GET /api/v1/namespaces/NS/secrets, with a
`metadata.name=` field selector) in the real API's JSON shapes, over plain HTTP on
loopback. The test drives it through /control:

  PUT  /control/pods              body: a JSON list of pods (replaces them all)
  PUT  /control/secrets           body: a JSON list of Secrets (replaces them all)
  POST /control/pods/NS/NAME      body: {"labels": {...}}: relabels a pod (MODIFIED event)
  GET  /control/requests          the API requests served so far, one per line

Usage: fake_kube_api.py PORT_FILE  (listens on a free port and writes it to PORT_FILE)
"""

import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Condition()
STATE = {"rv": 1, "pods": {}, "secrets": {}, "events": [], "requests": []}


def obj_key(p):
    return (p["metadata"]["namespace"], p["metadata"]["name"])


def bump(kind, obj):
    """Records a change: a new resourceVersion on the object, an event for watchers."""
    STATE["rv"] += 1
    obj["metadata"]["resourceVersion"] = str(STATE["rv"])
    STATE["events"].append((STATE["rv"], kind, json.loads(json.dumps(obj))))
    LOCK.notify_all()


def field(query, name):
    for sel in query.get("fieldSelector", []):
        for part in sel.split(","):
            if part.startswith(name + "="):
                return part.split("=", 1)[1]
    return None


def selects(obj, resource, namespace, query):
    """Whether a list or watch of `resource` (in `namespace`) with `query` shows obj."""
    if obj.get("kind") != {"pods": "Pod", "secrets": "Secret"}[resource]:
        return False
    if namespace is not None and obj["metadata"]["namespace"] != namespace:
        return False
    node = field(query, "spec.nodeName")
    if node is not None and obj.get("spec", {}).get("nodeName") != node:
        return False
    name = field(query, "metadata.name")
    if name is not None and obj["metadata"]["name"] != name:
        return False
    return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        n = int(self.headers.get("Content-Length", "0"))
        return json.loads(self.rfile.read(n) or b"null")

    def do_PUT(self):
        if self.path not in ("/control/pods", "/control/secrets"):
            return self.send_json(404, {})
        store = STATE[self.path.rsplit("/", 1)[1]]
        objs = self.read_body()
        with LOCK:
            new = {obj_key(p): p for p in objs}
            for k, p in list(store.items()):
                if k not in new:
                    del store[k]
                    bump("DELETED", p)
            for k, p in new.items():
                kind = "MODIFIED" if k in store else "ADDED"
                store[k] = p
                bump(kind, p)
        self.send_json(200, {"resourceVersion": str(STATE["rv"])})

    def do_POST(self):
        parts = self.path.strip("/").split("/")
        if len(parts) != 4 or parts[:2] != ["control", "pods"]:
            return self.send_json(404, {})
        body = self.read_body()
        with LOCK:
            pod = STATE["pods"].get((parts[2], parts[3]))
            if pod is None:
                return self.send_json(404, {})
            pod["metadata"]["labels"] = body["labels"]
            bump("MODIFIED", pod)
        self.send_json(200, {"resourceVersion": str(STATE["rv"])})

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/control/requests":
            with LOCK:
                body = "\n".join(STATE["requests"]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        parts = url.path.strip("/").split("/")
        if url.path == "/api/v1/pods":
            resource, namespace = "pods", None
        elif len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
            resource, namespace = "secrets", parts[3]
        else:
            return self.send_json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "NotFound", "code": 404,
                                        "message": f"{url.path} not served here"})
        with LOCK:
            STATE["requests"].append(self.path)
        if query.get("watch", ["false"])[0] in ("true", "1"):
            return self.watch(query, resource, namespace)
        with LOCK:
            items = [p for p in STATE[resource].values() if selects(p, resource, namespace, query)]
            self.send_json(200, {
                "kind": {"pods": "PodList", "secrets": "SecretList"}[resource], "apiVersion": "v1",
                "metadata": {"resourceVersion": str(STATE["rv"])},
                "items": items,
            })

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def watch(self, query, resource, namespace):
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        timeout = min(int(query.get("timeoutSeconds", ["290"])[0]), 290)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                with LOCK:
                    pending = [e for e in STATE["events"] if e[0] > since]
                    if not pending:
                        LOCK.wait(timeout=1.0)
                        continue
                for rv, kind, obj in pending:
                    since = rv
                    if not selects(obj, resource, namespace, query):
                        continue
                    self.chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
