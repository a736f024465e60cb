#!/usr/bin/env python3
"""Postgres protocol peers for the auditor's integration tests (TLS ones mostly).

client: a Postgres client that negotiates TLS (SSLRequest, then a TLS handshake), logs
        in with trust authentication, runs each --query with the simple protocol and
        exits. --bio memory runs OpenSSL over memory buffers (as Node.js and Python's
        asyncio do), so no socket is under the library's calls; --bio socket lets the
        library read and write the socket itself (as libpq does); --bio none speaks
        plaintext. --source-port binds the client's own port (to make two connections
        with the very same addresses and ports in two network namespaces); --pause waits
        between queries.
proxy:  a TLS-terminating front for a Postgres server: answers SSLRequest with 'S',
        decrypts with OpenSSL over memory buffers, and forwards the plaintext to
        --upstream over plain TCP.
"""

import argparse
import select
import socket
import ssl
import struct
import sys
import threading
import time

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


class MemoryTls:
    """OpenSSL over memory buffers, with the socket driven by this code."""

    def __init__(self, sock, ctx, server_side):
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side)

    def flush(self):
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.incoming.write(data)

    def handshake(self):
        while True:
            try:
                self.obj.do_handshake()
                self.flush()
                return
            except ssl.SSLWantReadError:
                self.flush()
                self.fill()

    def sendall(self, data):
        self.obj.write(data)
        self.flush()

    def recv(self, n):
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                self.flush()
                self.fill()

    def pending_plaintext(self):
        """Decrypts what the socket delivered so far; b'' if nothing complete yet."""
        try:
            return self.obj.read(65536)
        except ssl.SSLWantReadError:
            return b""


def read_message(conn):
    head = recv_exact(conn, 5)
    tag, length = head[:1], struct.unpack("!i", head[1:])[0]
    return tag, recv_exact(conn, length - 4)


def run_client(args):
    if args.source_port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.source_port))
        sock.connect(("127.0.0.1", args.port))
    else:
        sock = socket.create_connection(("127.0.0.1", args.port))
    if args.bio != "none":
        sock.sendall(SSL_REQUEST)
        if sock.recv(1) != b"S":
            sys.exit("server refused TLS")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if args.bio == "none":
        conn = sock
    elif args.bio == "memory":
        conn = MemoryTls(sock, ctx, server_side=False)
        conn.handshake()
    else:
        conn = ctx.wrap_socket(sock)
    params = b""
    for k, v in (("user", "postgres"), ("database", "postgres"), ("application_name", args.app)):
        params += k.encode() + b"\0" + v.encode() + b"\0"
    params += b"\0"
    conn.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    while True:
        tag, body = read_message(conn)
        if tag == b"E":
            sys.exit("login failed: %r" % body)
        if tag == b"Z":
            break
    queries = list(args.query)
    if args.big:
        queries.append("SELECT length('" + "y" * args.big + "')")
    for i, q in enumerate(queries):
        if i > 0:
            time.sleep(args.pause)
        data = q.encode() + b"\0"
        conn.sendall(b"Q" + struct.pack("!i", 4 + len(data)) + data)
        while True:
            tag, _ = read_message(conn)
            if tag == b"Z":
                break
    conn.sendall(b"X" + struct.pack("!i", 4))
    time.sleep(0.1)
    sock.close()
    print("done", flush=True)


def serve(client, args, ctx):
    try:
        first = recv_exact(client, 8)
        if first != SSL_REQUEST:
            print("proxy: not an SSLRequest: %r" % (first,), file=sys.stderr, flush=True)
            client.close()
            return
        client.sendall(b"S")
        tls = MemoryTls(client, ctx, server_side=True)
        tls.handshake()
        upstream = socket.create_connection(("127.0.0.1", args.upstream))
        while True:
            # Records that arrived with the handshake, or with an earlier read, are already
            # in the memory buffer: forward them before waiting for the socket again.
            while True:
                data = tls.pending_plaintext()
                if not data:
                    break
                upstream.sendall(data)
            readable, _, _ = select.select([client, upstream], [], [])
            if client in readable:
                tls.fill()
            if upstream in readable:
                data = upstream.recv(65536)
                if not data:
                    break
                tls.sendall(data)
    except EOFError:
        pass  # the client went away: the normal end
    except (OSError, ssl.SSLError) as e:
        print("proxy: connection ended: %r" % (e,), file=sys.stderr, flush=True)
    finally:
        client.close()


def run_proxy(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.listen))
    listener.listen(16)
    print("listening", flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, args=(client, args, ctx), daemon=True).start()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--app", default="pg_tls")
    c.add_argument("--bio", choices=["memory", "socket", "none"], default="memory")
    c.add_argument("--source-port", type=int, default=0)
    c.add_argument("--pause", type=float, default=0.0, help="seconds between queries")
    c.add_argument("--big", type=int, default=0, help="one more query of about this many bytes")
    c.add_argument("--wait", type=float, default=0.0, help="seconds to wait before connecting")
    c.add_argument("--query", action="append", default=[])
    x = sub.add_parser("proxy")
    x.add_argument("--listen", type=int, required=True)
    x.add_argument("--upstream", type=int, required=True)
    x.add_argument("--cert", required=True)
    x.add_argument("--key", required=True)
    args = p.parse_args()
    if args.mode == "client":
        time.sleep(args.wait)
        run_client(args)
    else:
        run_proxy(args)


if __name__ == "__main__":
    main()
