// Compatibility matrix, amqplib: node matrix_amqplib.js AMQP STOMP WS (promise|callback)
// The same scenarios through amqplib's promise API or its callback API
// (amqplib/callback_api; its asynchronous methods are awaited here through a
// thin promise wrapper, every call still goes through the callback model).
const crypto = require('crypto');
const { amqpPort, NotApplicable, restart, sleep, check, waitUntil, sha, run, standard, done } = require('./matrix_common');

const mode = process.argv[5] || 'promise';
const CLIENT = mode === 'callback' ? 'amqplib (callback API)' : 'amqplib (promise API)';
const URL = `amqp://guest:guest@127.0.0.1:${amqpPort}`;
const P = mode === 'callback' ? 'nc' : 'np'; // queue name prefix

const ASYNC = ['assertQueue', 'assertExchange', 'bindQueue', 'unbindQueue', 'checkQueue', 'deleteQueue', 'purgeQueue',
  'prefetch', 'consume', 'cancel', 'get', 'close', 'waitForConfirms'];
function promisified(obj, methods) {
  return new Proxy(obj, {
    get(t, k) {
      if (methods.includes(k)) return (...a) => new Promise((res, rej) => t[k](...a, (e, v) => (e ? rej(e) : res(v))));
      const v = t[k];
      return typeof v === 'function' ? v.bind(t) : v;
    },
  });
}

async function connect() {
  if (mode === 'promise') return require('amqplib').connect(URL);
  const conn = await new Promise((res, rej) => require('amqplib/callback_api').connect(URL, (e, c) => (e ? rej(e) : res(c))));
  const wrapped = promisified(conn, ['close']);
  for (const m of ['createChannel', 'createConfirmChannel']) {
    const open = conn[m].bind(conn);
    wrapped[m] = () => new Promise((res, rej) => open((e, ch) => (e ? rej(e) : res(promisified(ch, ASYNC)))));
  }
  return wrapped;
}

// Every asynchronous call below passes all its arguments: the callback API
// expects its callback in last position.
const count = async (ch, q) => (await ch.checkQueue(q)).messageCount;

async function drain(ch, q) {
  const out = [];
  for (;;) {
    const m = await ch.get(q, { noAck: true });
    if (!m) return out;
    out.push(m.content.toString());
  }
}

function sink(ch, q, noAck = true) {
  const s = { got: [] };
  s.ready = ch.consume(q, (m) => { if (m) s.got.push(m); }, { noAck });
  return s;
}

async function declareBind() {
  const c = await connect();
  const ch = await c.createChannel();
  const q = {};
  for (const t of ['direct', 'fanout', 'topic', 'headers']) {
    await ch.assertExchange(`${P}.${t}`, t, { durable: false });
    q[t] = (await ch.assertQueue('', { exclusive: true })).queue;
  }
  await ch.bindQueue(q.direct, `${P}.direct`, 'k1', {});
  await ch.bindQueue(q.fanout, `${P}.fanout`, '', {});
  await ch.bindQueue(q.topic, `${P}.topic`, '#.c', {});
  await ch.bindQueue(q.headers, `${P}.headers`, '', { 'x-match': 'all', h: '1' });
  ch.publish(`${P}.direct`, 'k1', Buffer.from('d'));
  ch.publish(`${P}.direct`, 'k2', Buffer.from('d-miss'));
  ch.publish(`${P}.fanout`, 'x', Buffer.from('f'));
  ch.publish(`${P}.topic`, 'a.b.c', Buffer.from('t'));
  ch.publish(`${P}.topic`, 'a.c.b', Buffer.from('t-miss'));
  ch.publish(`${P}.headers`, '', Buffer.from('h'), { headers: { h: '1' } });
  ch.publish(`${P}.headers`, '', Buffer.from('h-miss'), { headers: { h: 1.5 } });
  for (const [t, want] of [['direct', 'd'], ['fanout', 'f'], ['topic', 't'], ['headers', 'h']]) {
    const got = await drain(ch, q[t]);
    check(JSON.stringify(got) === JSON.stringify([want]), `${t}: ${got}`);
  }
  await c.close();
}

async function publishConsumeAck() {
  const c = await connect();
  let ch = await c.createChannel();
  const q = `${P}.ack`;
  await ch.assertQueue(q, {});
  for (let i = 0; i < 20; i++) ch.sendToQueue(q, Buffer.from('m' + i));
  let s = sink(ch, q, false);
  await waitUntil(() => s.got.length === 20, '20 deliveries');
  check(s.got.map((m) => m.content.toString()).join() === [...Array(20).keys()].map((i) => 'm' + i).join(), 'order');
  for (const m of s.got.slice(0, 10)) ch.ack(m);
  await ch.close();
  ch = await c.createChannel();
  s = sink(ch, q, false);
  await waitUntil(() => s.got.length === 10, '10 redeliveries');
  check(s.got.every((m) => m.fields.redelivered), 'redelivered flag');
  check(s.got.map((m) => m.content.toString()).join() === [...Array(10).keys()].map((i) => 'm' + (i + 10)).join(), 'redelivered order');
  ch.ackAll();
  await ch.cancel((await s.ready).consumerTag);
  check((await count(ch, q)) === 0, 'queue not empty after acks');
  await c.close();
}

async function prefetch() {
  const c = await connect();
  const ch = await c.createChannel();
  const q = `${P}.prefetch`;
  await ch.assertQueue(q, {});
  for (let i = 0; i < 10; i++) ch.sendToQueue(q, Buffer.from(String(i)));
  await ch.prefetch(3, false);
  const s = sink(ch, q, false);
  for (const want of [3, 4]) {
    if (want === 4) ch.ack(s.got[0]);
    await waitUntil(() => s.got.length >= want, `${want} deliveries`);
    await sleep(300);
    check(s.got.length === want, `${s.got.length} unacked deliveries, prefetch 3 allows ${want}`);
  }
  await c.close();
}

function confirmPublish(ch, q, body) {
  return new Promise((res) => ch.sendToQueue(q, Buffer.from(body), {}, (err) => res(err ? 'nack' : 'ack')));
}

async function confirms() {
  const c = await connect();
  const ch = await c.createConfirmChannel();
  await ch.assertQueue(`${P}.confirm`, {});
  await ch.assertQueue(`${P}.full`, { arguments: { 'x-max-length': 1, 'x-overflow': 'reject-publish' } });
  const outcomes = [];
  for (let i = 0; i < 50; i++) outcomes.push(confirmPublish(ch, `${P}.confirm`, String(i)));
  outcomes.push(confirmPublish(ch, `${P}.full`, '1'), confirmPublish(ch, `${P}.full`, '2'));
  const got = await Promise.all(outcomes);
  check(got.slice(0, 51).every((o) => o === 'ack') && got[51] === 'nack', `confirms ${got}`);
  let nacked = false;
  try { ch.sendToQueue(`${P}.full`, Buffer.from('3')); await ch.waitForConfirms(); } catch (e) { nacked = true; }
  check(nacked, 'waitForConfirms did not report the nack');
  check((await count(ch, `${P}.confirm`)) === 50, '50 confirmed messages');
  await c.close();
}

async function mandatoryReturn() {
  const c = await connect();
  const ch = await c.createChannel();
  const returned = [];
  ch.on('return', (m) => returned.push([m.fields.replyCode, m.fields.replyText, m.fields.routingKey, m.content.toString()]));
  ch.publish('amq.direct', 'nowhere', Buffer.from('r'), { mandatory: true });
  await waitUntil(() => returned.length, 'basic.return');
  check(JSON.stringify(returned) === JSON.stringify([[312, 'NO_ROUTE', 'nowhere', 'r']]), JSON.stringify(returned));
  await c.close();
}

async function deadLetter() {
  const c = await connect();
  const ch = await c.createChannel();
  await ch.assertQueue(`${P}.dlq`, {});
  await ch.assertQueue(`${P}.src`, { deadLetterExchange: '', deadLetterRoutingKey: `${P}.dlq` });
  ch.sendToQueue(`${P}.src`, Buffer.from('dead'));
  const m = await waitUntil(() => ch.get(`${P}.src`, { noAck: false }), 'delivery');
  ch.nack(m, false, false);
  const d = await waitUntil(() => ch.get(`${P}.dlq`, { noAck: true }), 'dead letter');
  const death = d.properties.headers['x-death'][0];
  check(d.content.toString() === 'dead' && death.reason === 'rejected' && death.queue === `${P}.src`, JSON.stringify(death));
  await c.close();
}

async function ttl() {
  const c = await connect();
  const ch = await c.createChannel();
  await ch.assertQueue(`${P}.ttl`, { messageTtl: 200 });
  await ch.assertQueue(`${P}.exp`, {});
  ch.sendToQueue(`${P}.ttl`, Buffer.from('gone'));
  ch.sendToQueue(`${P}.exp`, Buffer.from('short'), { expiration: 100 });
  ch.sendToQueue(`${P}.exp`, Buffer.from('keep'));
  await sleep(1000);
  check((await drain(ch, `${P}.ttl`)).length === 0, 'x-message-ttl did not expire');
  const left = await drain(ch, `${P}.exp`);
  check(left.join() === 'keep', 'per-message expiration: ' + left);
  await c.close();
}

async function priority() {
  const c = await connect();
  const ch = await c.createChannel();
  await ch.assertQueue(`${P}.prio`, { maxPriority: 10 });
  [1, 5, 9, 0, 5].forEach((p, i) => ch.sendToQueue(`${P}.prio`, Buffer.from(`p${p}-${i}`), { priority: p }));
  const got = await drain(ch, `${P}.prio`);
  check(got.join() === 'p9-2,p5-1,p5-4,p1-0,p0-3', 'order ' + got);
  await c.close();
}

async function transactions() {
  throw new NotApplicable('amqplib has no tx.select/commit/rollback API');
}

async function reconnect() {
  let c = await connect();
  const closed = new Promise((res) => c.on('close', res));
  c.on('error', () => {});
  let ch = await c.createConfirmChannel();
  await ch.assertQueue(`${P}.durable`, { durable: true });
  for (let i = 0; i < 3; i++) ch.sendToQueue(`${P}.durable`, Buffer.from('s' + i), { persistent: true });
  await ch.waitForConfirms();
  await restart();
  await Promise.race([closed, sleep(10000).then(() => { throw new Error('old connection not closed'); })]);
  c = await connect();
  ch = await c.createChannel();
  const got = await drain(ch, `${P}.durable`);
  check(got.join() === 's0,s1,s2', 'after restart ' + got);
  await c.close();
}

async function large() {
  const body = crypto.randomBytes(16 * 1024 * 1024);
  const c = await connect();
  const ch = await c.createChannel();
  await ch.assertQueue(`${P}.large`, {});
  ch.sendToQueue(`${P}.large`, body);
  const s = sink(ch, `${P}.large`, false);
  await waitUntil(() => s.got.length, 'the large message', 20000);
  const got = s.got[0].content;
  ch.ack(s.got[0]);
  check(got.length === body.length && sha(got) === sha(body), `${got.length} bytes, checksum differs`);
  await c.close();
}

async function connections500() {
  const t = Date.now();
  const conns = await Promise.all([...Array(500)].map(() => connect()));
  const opened = (Date.now() - t) / 1000;
  const chans = await Promise.all(conns.map((c) => c.createChannel()));
  await chans[0].assertQueue(`${P}.c500`, {});
  chans.forEach((ch, i) => ch.sendToQueue(`${P}.c500`, Buffer.from(String(i))));
  await waitUntil(async () => (await count(chans[0], `${P}.c500`)) === 500, '500 messages from 500 connections', 10000);
  await Promise.all(conns.map((c) => c.close()));
  return `500 opened concurrently in ${opened.toFixed(1)}s`;
}

run(CLIENT, standard({
  declareBind, publishConsumeAck, prefetch, confirms, mandatoryReturn, deadLetter,
  ttl, priority, transactions, reconnect, large, connections500,
})).then(done);
