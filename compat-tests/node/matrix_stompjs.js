// Compatibility matrix, @stomp/stompjs over WebSocket (ws://127.0.0.1:PORT/ws,
// STOMP 1.2): node matrix_stompjs.js AMQP STOMP WS
// AMQP-only scenarios map as for stomp.py: confirms to RECEIPTs, dead-lettering
// to NACK requeue:false, priorities to the priority header; mandatory returns n/a.
const crypto = require('crypto');
const { Client } = require('@stomp/stompjs');
const WebSocket = require('ws');
const { wsPort, NotApplicable, restart, sleep, check, waitUntil, sha, run, standard, done } = require('./matrix_common');

const CLIENT = '@stomp/stompjs (WebSocket)';
const URL = `ws://127.0.0.1:${wsPort}/ws`;

function connect(extra = {}) {
  return new Promise((resolve, reject) => {
    const st = { msgs: [], receipts: new Set(), errors: [], closed: false, connects: 0 };
    const client = new Client({
      webSocketFactory: () => new WebSocket(URL, ['v10.stomp', 'v11.stomp', 'v12.stomp']),
      connectHeaders: { login: 'guest', passcode: 'guest', host: '/' },
      reconnectDelay: 0,
      heartbeatIncoming: 0,
      heartbeatOutgoing: 0,
      debug: () => {},
      onConnect: (f) => { st.connects += 1; st.version = f.headers.version; resolve(st); },
      onStompError: (f) => st.errors.push(f.headers.message || 'ERROR'),
      onWebSocketClose: () => { st.closed = true; },
      onWebSocketError: (e) => reject(new Error('WebSocket error ' + (e.message || e))),
      onUnhandledReceipt: (f) => st.receipts.add(f.headers['receipt-id']),
      ...extra,
    });
    st.client = client;
    st.sub = (dest, headers = {}) => client.subscribe(dest, (m) => st.msgs.push(m), headers);
    st.send = (destination, body, headers = {}) => client.publish({ destination, body, headers });
    st.get = (timeout = 5000) => waitUntil(() => st.msgs.length, 'a MESSAGE', timeout).then(() => st.msgs.shift());
    st.nothing = async (ms = 300) => { await sleep(ms); check(st.msgs.length === 0, 'unexpected MESSAGE ' + (st.msgs[0] && st.msgs[0].body)); };
    st.receipt = (id, timeout = 5000) => waitUntil(() => st.receipts.has(id), 'RECEIPT ' + id, timeout);
    st.close = () => client.deactivate();
    client.activate();
  });
}

async function declareBind() {
  const s = await connect();
  check(s.version === '1.2', 'negotiated ' + s.version);
  s.sub('/exchange/amq.topic/js.*.x', { id: 't' });
  s.sub('/exchange/amq.direct/js-k', { id: 'd' });
  s.sub('/queue/js-declared', { id: 'q', durable: 'true', 'auto-delete': 'false' });
  s.send('/topic/js.a.x', 't', { receipt: 'r1' });
  await s.receipt('r1');
  s.send('/topic/js.a.y', 't-miss');
  s.send('/exchange/amq.direct/js-k', 'd');
  s.send('/exchange/amq.direct/js-other', 'd-miss');
  s.send('/amq/queue/js-declared', 'q');
  const got = [];
  for (let i = 0; i < 3; i++) { const m = await s.get(); got.push(m.headers.subscription + ':' + m.body); }
  check(got.sort().join() === 'd:d,q:q,t:t', 'routed ' + got);
  await s.nothing();
  check(s.errors.length === 0, s.errors.join());
  await s.close();
}

async function publishConsumeAck() {
  let s = await connect();
  for (let i = 0; i < 10; i++) s.send('/queue/js-ack', 'm' + i);
  s.sub('/queue/js-ack', { ack: 'client-individual' });
  const got = [];
  for (let i = 0; i < 10; i++) got.push(await s.get());
  check(got.map((m) => m.body).join() === [...Array(10).keys()].map((i) => 'm' + i).join(), 'order');
  got.slice(0, 5).forEach((m) => m.ack());
  await s.close();
  s = await connect();
  s.sub('/queue/js-ack', { ack: 'client-individual' });
  const again = [];
  for (let i = 0; i < 5; i++) again.push(await s.get());
  check(again.map((m) => m.body).join() === 'm5,m6,m7,m8,m9', 'redelivered ' + again.map((m) => m.body));
  check(again.every((m) => m.headers.redelivered === 'true'), 'redelivered header');
  again.forEach((m) => m.ack());
  await s.nothing();
  await s.close();
}

async function prefetch() {
  const s = await connect();
  for (let i = 0; i < 6; i++) s.send('/queue/js-prefetch', String(i));
  s.sub('/queue/js-prefetch', { ack: 'client-individual', 'prefetch-count': '2' });
  const first = [await s.get(), await s.get()];
  await s.nothing(500);
  first[0].ack();
  await s.get();
  await s.nothing(500);
  await s.close();
}

async function confirms() {
  const s = await connect();
  for (let i = 0; i < 20; i++) s.send('/queue/js-receipts', String(i), { receipt: 'c' + i, persistent: 'true' });
  for (let i = 0; i < 20; i++) await s.receipt('c' + i);
  s.sub('/queue/js-receipts');
  const got = [];
  for (let i = 0; i < 20; i++) got.push((await s.get()).body);
  check(got.join() === [...Array(20).keys()].join(), 'receipted messages ' + got);
  await s.close();
  return 'confirms mapped to RECEIPT frames';
}

async function mandatoryReturn() {
  throw new NotApplicable('STOMP has no mandatory flag or basic.return');
}

async function deadLetter() {
  const s = await connect();
  s.sub('/queue/js-dlq', { id: 'dlq' });
  s.sub('/queue/js-src', { id: 'src', ack: 'client-individual', 'x-dead-letter-exchange': '', 'x-dead-letter-routing-key': 'js-dlq' });
  s.send('/queue/js-src', 'dead');
  const m = await s.get();
  check(m.headers.subscription === 'src', JSON.stringify(m.headers));
  m.nack({ requeue: 'false' });
  const d = await s.get();
  check(d.headers.subscription === 'dlq' && d.body === 'dead', JSON.stringify(d.headers));
  check(d.headers['x-first-death-reason'] === 'rejected', 'x-first-death-reason ' + d.headers['x-first-death-reason']);
  await s.close();
}

async function ttl() {
  const s = await connect();
  s.send('/queue/js-exp', 'short', { expiration: '100' });
  s.send('/queue/js-exp', 'keep', { receipt: 'r' });
  await s.receipt('r');
  await sleep(800);
  s.sub('/queue/js-exp');
  check((await s.get()).body === 'keep', 'expired message delivered');
  await s.nothing();
  await s.close();
}

async function priority() {
  const s = await connect();
  const args = { 'x-max-priority': '10' };
  s.sub('/queue/js-prio', { id: 'declare', ...args }).unsubscribe();
  [1, 5, 9, 0, 5].forEach((p, i) => s.send('/queue/js-prio', `p${p}-${i}`, { priority: String(p), receipt: 'p' + i }));
  await s.receipt('p4');
  s.sub('/queue/js-prio', { id: 's', ...args });
  const got = [];
  for (let i = 0; i < 5; i++) got.push((await s.get()).body);
  check(got.join() === 'p9-2,p5-1,p5-4,p1-0,p0-3', 'order ' + got);
  await s.close();
}

async function transactions() {
  const s = await connect();
  s.sub('/queue/js-tx');
  let tx = s.client.begin();
  s.send('/queue/js-tx', 'aborted', { transaction: tx.id });
  tx.abort();
  tx = s.client.begin();
  s.send('/queue/js-tx', 'committed', { transaction: tx.id });
  await s.nothing();
  tx.commit();
  check((await s.get()).body === 'committed', 'commit');
  await s.nothing();
  await s.close();
}

async function reconnect() {
  // stompjs reconnects by itself (reconnectDelay) once the broker is back.
  const s = await connect({ reconnectDelay: 200 });
  for (let i = 0; i < 3; i++) s.send('/queue/js-durable', 's' + i, { persistent: 'true', receipt: 's' + i });
  await s.receipt('s2');
  await restart();
  await waitUntil(() => s.connects === 2, 'the automatic reconnect', 15000);
  s.sub('/queue/js-durable');
  const got = [];
  for (let i = 0; i < 3; i++) got.push((await s.get()).body);
  check(got.join() === 's0,s1,s2', 'after restart ' + got);
  await s.close();
  return 'reconnected by stompjs itself';
}

async function large() {
  let s = await connect();
  const body = crypto.randomBytes(4 * 1024 * 1024 - 64 * 1024);
  s.client.publish({ destination: '/queue/js-large', binaryBody: body, headers: { 'content-type': 'application/octet-stream', receipt: 'big' } });
  await s.receipt('big', 20000);
  s.sub('/queue/js-large');
  const m = await s.get(20000);
  const got = Buffer.from(m.binaryBody);
  check(got.length === body.length && sha(got) === sha(body), `${got.length} bytes, checksum differs`);
  await s.close();
  s = await connect();
  s.client.publish({ destination: '/queue/js-large', binaryBody: crypto.randomBytes(16 * 1024 * 1024) });
  await waitUntil(() => s.closed, 'the connection to close on a 16 MiB frame', 20000);
  await s.close();
  return `16 MiB frame refused (${s.errors.length ? 'ERROR ' + s.errors[0] : 'WebSocket closed'}), as RabbitMQ's 4 MiB limit; 3.94 MiB round-trips`;
}

async function connections500() {
  const t = Date.now();
  const all = await Promise.all([...Array(500)].map(() => connect()));
  const opened = (Date.now() - t) / 1000;
  all.forEach((s, i) => s.send('/queue/js-c500', String(i)));
  all[0].sub('/queue/js-c500');
  const got = new Set();
  for (let i = 0; i < 500; i++) got.add((await all[0].get()).body);
  check(got.size === 500, `${got.size} distinct messages`);
  await Promise.all(all.map((s) => s.close()));
  return `500 opened concurrently in ${opened.toFixed(1)}s`;
}

run(CLIENT, standard({
  declareBind, publishConsumeAck, prefetch, confirms, mandatoryReturn, deadLetter,
  ttl, priority, transactions, reconnect, large, connections500,
})).then(done);
