// Peer server for benches/compare: Bun's built-in uWebSockets pub/sub (Bun.serve).
//
// The minimal peer contract, on one port (env PORT):
//   GET  /ws?topic=A&topic=B  WebSocket, subscribed to every `topic` on connect (ws.subscribe)
//   POST /publish?topic=T     the raw body to every subscriber of T as one text frame
//                             (server.publish), answers 200
// Prints `ready` once listening.

type Data = { topics: string[] };

const port = Number(process.env.PORT ?? 9000);
const hostname = process.env.HOST ?? "127.0.0.1";

const server = Bun.serve<Data, {}>({
  port,
  hostname,
  async fetch(req, server) {
    const url = new URL(req.url);
    if (url.pathname === "/ws") {
      const topics = url.searchParams.getAll("topic");
      if (topics.length === 0) topics.push("idle");
      if (server.upgrade(req, { data: { topics } })) return undefined;
      return new Response("websocket upgrade expected\n", { status: 400 });
    }
    if (url.pathname === "/publish" && req.method === "POST") {
      const topic = url.searchParams.get("topic");
      if (!topic) return new Response("topic required\n", { status: 400 });
      server.publish(topic, await req.text());
      return new Response("ok\n");
    }
    return new Response("not found\n", { status: 404 });
  },
  websocket: {
    perMessageDeflate: false,
    open(ws) {
      for (const t of ws.data.topics) ws.subscribe(t);
    },
    message() {},
  },
});

console.log("ready");
void server;
