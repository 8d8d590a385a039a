// @stomp/stompjs over WebSocket (the `ws` package as Node's WebSocket) against
// a running broker: node smoke_stompjs.js WEB_STOMP_PORT
// Connects to ws://127.0.0.1:PORT/ws, subscribes with client-individual acks,
// publishes text and binary bodies (with a receipt), receives and acks them,
// and disconnects.
const { Client } = require('@stomp/stompjs');
const WebSocket = require('ws');

const port = process.argv[2];
const url = `ws://127.0.0.1:${port}/ws`;
const fail = (why) => { console.error('FAIL', why); process.exit(1); };
setTimeout(() => fail('timed out'), 15000).unref();

let socket = null;
const client = new Client({
  webSocketFactory: () => (socket = new WebSocket(url, ['v10.stomp', 'v11.stomp', 'v12.stomp'])),
  connectHeaders: { login: 'guest', passcode: 'guest', host: '/' },
  heartbeatIncoming: 1000,
  heartbeatOutgoing: 1000,
  reconnectDelay: 0,
  onStompError: (f) => fail(`ERROR ${f.headers.message}: ${f.body}`),
  onWebSocketError: (e) => fail(`WebSocket error ${e.message || e}`),
});

client.onConnect = (connected) => {
  if (connected.headers.version !== '1.2') fail('version ' + connected.headers.version);
  if (socket.protocol !== 'v12.stomp') fail('subprotocol ' + socket.protocol);
  const got = [];
  client.subscribe('/queue/stompjs', (m) => {
    got.push(m);
    m.ack();
    if (got.length < 3) return;
    if (got[0].body !== 'hello ✓') fail('body 0: ' + got[0].body);
    if (got[1].headers['x-custom'] !== 'yes' || got[1].body !== 'second') fail('message 1: ' + JSON.stringify(got[1].headers));
    const bin = Array.from(got[2].binaryBody);
    if (JSON.stringify(bin) !== JSON.stringify([255, 0, 254])) fail('binary body: ' + bin);
    client.deactivate().then(() => { console.log('stompjs ok'); process.exit(0); });
  }, { ack: 'client-individual', 'prefetch-count': '10' });
  client.watchForReceipt('sent-1', () => {
    client.publish({ destination: '/queue/stompjs', body: 'second', headers: { 'x-custom': 'yes' } });
    client.publish({ destination: '/queue/stompjs', binaryBody: new Uint8Array([255, 0, 254]), headers: { 'content-type': 'application/octet-stream' } });
  });
  client.publish({ destination: '/queue/stompjs', body: 'hello ✓', headers: { receipt: 'sent-1' } });
};

client.activate();
