#!/usr/bin/env python3
"""The approvals test's pipeline through psycopg 3 (libpq's pipeline mode): three
statements and one Sync; the middle one (a DELETE) is held at its Bind, and the statement
pipelined behind it waits with it, then runs after the approval, in order.

usage: psycopg_hold.py PORT
"""

import sys

import psycopg


def main(port):
    conn = psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                           autocommit=True)
    with conn.pipeline():
        first = conn.execute("SELECT 'before'")
        held = conn.execute("DELETE FROM accounts WHERE id = %s", (3,))
        after = conn.execute("SELECT count(*) FROM accounts")
    print("pipeline", first.fetchone()[0], held.rowcount, after.fetchone()[0], flush=True)
    conn.close()
    print("done", flush=True)


main(int(sys.argv[1]))
