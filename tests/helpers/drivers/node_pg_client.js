// The drivers test's workload through node-postgres (pg, pure JavaScript): parameterised
// queries (Parse/Bind/Describe/Execute/Sync in one write), named prepared statements, a
// failed statement, a rolled-back transaction, a large result.
//
// usage: NODE_PATH=<dir with pg> node node_pg_client.js PORT APP SECRET
const { Client } = require('pg');

async function main() {
  const [port, app, secret] = process.argv.slice(2);
  const c = new Client({ host: '127.0.0.1', port: Number(port), user: 'postgres', database: 'postgres', application_name: app });
  await c.connect();
  await c.query('DROP TABLE IF EXISTS drv_node');
  await c.query('CREATE TABLE drv_node (id int PRIMARY KEY, name text, secret text)');
  for (let i = 0; i < 50; i++) {
    await c.query('INSERT INTO drv_node VALUES ($1, $2, $3)', [i, `name ${i}`, `${secret}-${i}`]);
  }
  console.log('inserts');
  for (let i = 0; i < 20; i++) {
    const r = await c.query({ name: 'by-id', text: 'SELECT name FROM drv_node WHERE id = $1', values: [i] });
    if (r.rows[0].name !== `name ${i}`) throw new Error(`row ${i}`);
  }
  console.log('prepared');
  const big = await c.query("SELECT repeat('x', 1000) AS r FROM generate_series(1, 2000)");
  if (big.rows.length !== 2000) throw new Error('rows');
  try {
    await c.query('SELECT * FROM drv_missing_table WHERE id = $1', [1]);
    throw new Error('no error from a missing table');
  } catch (e) {
    if (e.code !== '42P01') throw e;
    console.log('error');
  }
  await c.query('BEGIN');
  await c.query('UPDATE drv_node SET name = $1 WHERE id = $2', ['renamed', 1]);
  await c.query('ROLLBACK');
  await c.end();
  console.log('done');
}

main().catch((e) => { console.error(e); process.exit(1); });
