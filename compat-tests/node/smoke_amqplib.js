// amqplib (promise API, confirm channel) against a running broker: node smoke_amqplib.js PORT
const amqp = require('amqplib');
const port = process.argv[2];
(async () => {
  const conn = await amqp.connect(`amqp://guest:guest@127.0.0.1:${port}`);
  const ch = await conn.createConfirmChannel();
  await ch.assertQueue('node-q', { durable: true });
  for (let i = 0; i < 50; i++) ch.sendToQueue('node-q', Buffer.from('n' + i), { persistent: true });
  await ch.waitForConfirms();
  const got = [];
  await new Promise((resolve) => {
    ch.consume('node-q', (m) => { if (m === null) return; // server-sent cancel (queue deleted below)
      got.push(m.content.toString()); ch.ack(m); if (got.length === 50) resolve(); });
  });
  for (let i = 0; i < 50; i++) if (got[i] !== 'n' + i) throw new Error('out of order: ' + got);
  // A channel error: 404 on a passive check, the connection stays usable.
  const other = await conn.createChannel();
  other.on('error', () => {});
  let code = null;
  try { await other.checkQueue('no-such-queue'); } catch (e) { code = e.code; }
  if (code !== 404) throw new Error('expected 404, got ' + code);
  const ch2 = await conn.createChannel();
  await ch2.deleteQueue('node-q');
  await conn.close();
  console.log('amqplib ok');
})().catch((e) => { console.error('FAIL', e); process.exit(1); });
