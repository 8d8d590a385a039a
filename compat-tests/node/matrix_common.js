// Shared by the compatibility-matrix scripts (matrix_*.js): the broker's ports
// from argv (AMQP STOMP WEB_STOMP), one JSON line per scenario, and the restart
// hook (print RESTART?, wait for RESTARTED on stdin).
const crypto = require('crypto');
const readline = require('readline');

const [amqpPort, stompPort, wsPort] = process.argv.slice(2, 5).map(Number);

class NotApplicable extends Error {}

const lines = [];
let waiter = null;
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (l) => { if (waiter) { const w = waiter; waiter = null; w(l); } else lines.push(l); });

async function restart() {
  console.log('RESTART?');
  const line = await new Promise((resolve) => (lines.length ? resolve(lines.shift()) : (waiter = resolve)));
  if (line.trim() !== 'RESTARTED') throw new Error('driver answered ' + line);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function check(cond, msg) { if (!cond) throw new Error('assertion failed: ' + msg); }

async function waitUntil(pred, what = 'condition', timeout = 5000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > deadline) throw new Error('timed out waiting for ' + what);
    await sleep(20);
  }
}

const sha = (b) => crypto.createHash('sha256').update(b).digest('hex');

function report(client, scenario, ok, detail, secs) {
  console.log(JSON.stringify({ client, scenario, ok, detail: detail || '', secs: Math.round(secs * 100) / 100 }));
}

// The scenarios every client script runs, in order: [matrix name, name of
// the script's function for it].
const SCENARIOS = [
  ['declare_bind', 'declareBind'],
  ['publish_consume_ack', 'publishConsumeAck'],
  ['prefetch', 'prefetch'],
  ['confirms', 'confirms'],
  ['mandatory_return', 'mandatoryReturn'],
  ['dead_letter', 'deadLetter'],
  ['ttl', 'ttl'],
  ['priority', 'priority'],
  ['transactions', 'transactions'],
  ['reconnect', 'reconnect'],
  ['large_16mib', 'large'],
  ['connections_500', 'connections500'],
];

// [name, fn] for every scenario of SCENARIOS, from an object of the script's functions.
function standard(fns) {
  return SCENARIOS.map(([name, key]) => {
    if (typeof fns[key] !== 'function') throw new Error(`no function ${key} for scenario ${name}`);
    return [name, fns[key]];
  });
}

// Runs each [name, fn] independently (60 s each at most).
async function run(client, scenarios) {
  for (const [name, fn] of scenarios) {
    const start = Date.now();
    let timer;
    try {
      const timeout = new Promise((_, rej) => { timer = setTimeout(() => rej(new Error('scenario timed out')), 60000); });
      const detail = await Promise.race([fn(), timeout]);
      report(client, name, true, detail, (Date.now() - start) / 1000);
    } catch (e) {
      if (e instanceof NotApplicable) report(client, name, null, e.message, 0);
      else { console.error(e); report(client, name, false, String(e && e.message || e), (Date.now() - start) / 1000); }
    } finally { clearTimeout(timer); }
  }
}

function done() { rl.close(); process.exit(0); }

module.exports = { amqpPort, stompPort, wsPort, NotApplicable, restart, sleep, check, waitUntil, sha, run, standard, done };
