#!/usr/bin/env python3
"""A session older than the daemon, through psycopg 3: three statements prepared on the
server (prepare=True: psycopg names them _pg3_N), then, once a line arrives on stdin (the
daemon has started), each executed 50 times through its prepared statement.

usage: psycopg_early.py PORT APP
"""

import sys

import psycopg

QUERIES = [
    ("SELECT %s::int + 1 AS n", (7,)),
    ("SELECT count(*) FROM pg_class WHERE relname <> %s", ("x",)),
    ("SELECT upper(%s::text) AS u", ("y",)),
]


def main(port, app):
    conn = psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="postgres",
        application_name=app, autocommit=True,
    )
    for q, p in QUERIES:
        conn.execute(q, p, prepare=True).fetchall()
    print("prepared", flush=True)
    sys.stdin.readline()
    for _ in range(50):
        for q, p in QUERIES:
            conn.execute(q, p, prepare=True).fetchall()
    conn.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
