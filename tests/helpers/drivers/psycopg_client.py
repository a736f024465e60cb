#!/usr/bin/env python3
"""The drivers test's workload through psycopg 3 (libpq): server-side binding, pipeline
mode (many statements, one Sync, an error in the middle that makes the server skip the
rest of the batch), binary results, COPY FROM STDIN.

usage: psycopg_client.py PORT APP SECRET
"""

import sys

import psycopg


def main(port, app, secret):
    conn = psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="postgres",
        application_name=app, autocommit=True,
    )
    conn.execute("DROP TABLE IF EXISTS drv_psycopg")
    conn.execute("CREATE TABLE drv_psycopg (id int PRIMARY KEY, name text, secret text)")
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO drv_psycopg VALUES (%s, %s, %s)",
            [(i, f"name {i}", f"{secret}-{i}") for i in range(50)],
        )
    print("executemany", flush=True)
    with conn.pipeline():
        for i in range(20):
            conn.execute("SELECT name FROM drv_psycopg WHERE id = %s", (i,), prepare=True)
    print("pipeline", flush=True)
    # One batch, one Sync: the second statement fails, the server skips the third.
    try:
        with conn.pipeline():
            conn.execute("UPDATE drv_psycopg SET name = %s WHERE id = %s", ("first", 2))
            conn.execute("SELECT * FROM drv_missing_table WHERE id = %s", (1,))
            conn.execute("UPDATE drv_psycopg SET name = %s WHERE id = %s", ("skipped", 3))
        sys.exit("no error from a missing table")
    except psycopg.errors.UndefinedTable:
        print("error", flush=True)
    assert conn.execute("SELECT name FROM drv_psycopg WHERE id = 3").fetchone()[0] == "name 3"
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT repeat('x', 1000) FROM generate_series(1, 2000)")
        assert len(cur.fetchall()) == 2000
    with conn.cursor() as cur:
        with cur.copy("COPY drv_psycopg (id, name, secret) FROM STDIN") as copy:
            for i in range(100, 1100):
                copy.write_row((i, f"copied {i}", f"{secret}-{i}"))
    print("done", flush=True)


main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
