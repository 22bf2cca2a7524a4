// A real, unmodified @stomp/stompjs client (with `ws` as its WebSocket, or sockjs-client)
// against herald.
// Usage: node stomp_client.mjs <scenario> <json args>; prints one JSON line per event, which
// tests/py/test_stomp_js.py reads and asserts on.
import { Client } from "@stomp/stompjs";
import SockJS from "sockjs-client";
import { WebSocket } from "ws";

Object.assign(globalThis, { WebSocket });

const [scenario, rawArgs] = process.argv.slice(2);
const args = JSON.parse(rawArgs);
const say = (event) => console.log(JSON.stringify(event));

async function publish(topic, rawData) {
  const body = `{"project":"${args.project}","topic":"${topic}","data":${rawData}}`;
  const r = await fetch(`${args.api}/api/v1/publish`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${args.adminKey}` },
    body,
  });
  return (await r.json()).id;
}

function client(extra) {
  // With `sockjsUrl`, through sockjs-client (its Node WebSocket transport) instead of `ws`.
  const transport = args.sockjsUrl
    ? { webSocketFactory: () => new SockJS(args.sockjsUrl) }
    : { brokerURL: args.url };
  return new Client({
    ...transport,
    connectHeaders: { Authorization: `Bearer ${args.token}` },
    reconnectDelay: 0,
    debug: () => {},
    ...extra,
  });
}

const received = (sub, m) => ({
  event: "message",
  sub,
  destination: m.headers.destination,
  messageId: m.headers["message-id"],
  contentType: m.headers["content-type"],
  body: m.body,
});

if (scenario === "deliver") {
  const c = client({});
  const got = [];
  let expected = 0;
  let nrPublished = 0;
  // Disconnects once every publish is answered (and printed) and every message is in.
  const done = () => {
    if (expected > 0 && nrPublished === expected && got.length === expected) {
      c.deactivate();
    }
  };
  c.onConnect = async (frame) => {
    say({ event: "connected", version: frame.headers.version, subprotocol: c.webSocket.protocol });
    c.subscribe("/topic/news", (m) => { got.push(m); say(received("news", m)); done(); });
    c.subscribe("/user/queue/notice", (m) => { got.push(m); say(received("notice", m)); done(); });
    // A SUBSCRIBE with a receipt: publishing after it is seen means the subscription is in.
    await new Promise((resolve) => {
      c.watchForReceipt("subscribed", resolve);
      c.subscribe("/topic/other", () => {}, { receipt: "subscribed" });
    });
    expected = args.publishes.length;
    for (const [topic, data] of args.publishes) {
      say({ event: "published", topic, id: await publish(topic, data), data });
      nrPublished += 1;
    }
    done();
  };
  c.onDisconnect = (frame) => {
    say({ event: "disconnected", command: frame.command, receiptId: frame.headers["receipt-id"] });
  };
  c.onWebSocketClose = (evt) => {
    say({ event: "closed", code: evt.code });
    process.exit(0);
  };
  c.activate();
} else if (scenario === "bad-token") {
  const c = client({ connectHeaders: { Authorization: "Bearer not.a.token" } });
  c.onConnect = () => say({ event: "connected" });
  c.onStompError = (frame) => say({ event: "error", message: frame.headers.message });
  c.onWebSocketClose = (evt) => {
    say({ event: "closed", code: evt.code });
    c.deactivate();
    process.exit(0);
  };
  c.activate();
} else if (scenario === "idle") {
  // Both sides' heart-beats on: stompjs closes a connection that sends it nothing for twice
  // the negotiated interval, so staying connected while idle needs herald's heart-beats.
  // Without `heartbeatMs`, stompjs' own defaults (10000,10000) are negotiated.
  const beats =
    args.heartbeatMs === undefined
      ? {}
      : { heartbeatIncoming: args.heartbeatMs, heartbeatOutgoing: 0 };
  const c = client(beats);
  c.onConnect = (frame) => {
    say({ event: "connected", heartBeat: frame.headers["heart-beat"] });
    setTimeout(() => {
      say({ event: "still-connected", connected: c.connected });
      c.deactivate();
    }, args.idleMs);
  };
  c.onWebSocketClose = (evt) => {
    say({ event: "closed", code: evt.code });
    process.exit(0);
  };
  c.activate();
} else {
  throw new Error(`unknown scenario ${scenario}`);
}
