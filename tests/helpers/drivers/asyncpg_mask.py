#!/usr/bin/env python3
"""The masking test's reads through asyncpg: results in the binary format, a statement
prepared once and executed again without a new Describe, a cursor fetched in pieces.

usage: asyncpg_mask.py PORT
Prints every value it received (repr), one result per line, then "done".
"""

import asyncio
import io
import sys

import asyncpg


async def main(port):
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres",
                                 database="postgres")
    rows = await conn.fetch("SELECT id, email, card, phone, note, age FROM customers ORDER BY id")
    print("fetch", [tuple(r) for r in rows], flush=True)
    stmt = await conn.prepare("SELECT email, age, note FROM customers WHERE id = $1")
    for i in (1, 2, 1):
        print("prepared", tuple(await stmt.fetchrow(i)), flush=True)
    async with conn.transaction():
        cur = await conn.cursor("SELECT id, email FROM customers ORDER BY id")
        print("cursor", [tuple(r) for r in await cur.fetch(2)], flush=True)
        print("cursor", [tuple(r) for r in await cur.fetch(2)], flush=True)
    # An expression over a masked column: masked whole.
    print("upper", [tuple(r) for r in await conn.fetch("SELECT upper(email) FROM customers")], flush=True)
    # Code the proxy cannot follow (a DO block) in a session that reads masked data.
    try:
        await conn.execute("DO $$ BEGIN PERFORM 1; END $$")
        sys.exit("a DO block was not refused")
    except asyncpg.exceptions.InsufficientPrivilegeError as e:
        print("refused", e.sqlstate, flush=True)
    print("unmasked", [tuple(r) for r in await conn.fetch("SELECT id, note FROM customers ORDER BY id")], flush=True)
    # COPY out, in asyncpg's binary and CSV forms: rewritten by the proxy.
    for fmt in ("binary", "csv"):
        out = io.BytesIO()
        await conn.copy_from_table("customers", output=out, format=fmt)
        print("copy", fmt, repr(out.getvalue()), flush=True)
    await conn.close()
    print("done", flush=True)


asyncio.run(main(int(sys.argv[1])))
