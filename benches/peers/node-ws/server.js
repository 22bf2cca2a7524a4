// Peer server for benches/compare: Node.js with the `ws` package.
//
// The minimal peer contract, on one port (env PORT):
//   GET  /ws?topic=A&topic=B  WebSocket, subscribed to every `topic` on connect
//   POST /publish?topic=T     the raw body to every subscriber of T as one text frame,
//                             answers 200
// Subscriptions: a Map topic -> Set of sockets. Prints `ready` once listening.
"use strict";

const http = require("node:http");
const { WebSocketServer } = require("ws");

const port = Number(process.env.PORT ?? 9000);
const host = process.env.HOST ?? "127.0.0.1";

/** @type {Map<string, Set<import("ws").WebSocket>>} */
const topics = new Map();

function subscribe(ws, topic) {
  let set = topics.get(topic);
  if (!set) topics.set(topic, (set = new Set()));
  set.add(ws);
}

function unsubscribe(ws, topic) {
  const set = topics.get(topic);
  if (!set) return;
  set.delete(ws);
  if (set.size === 0) topics.delete(topic);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://peer");
  if (req.method === "POST" && url.pathname === "/publish") {
    const topic = url.searchParams.get("topic");
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      if (!topic) {
        res.writeHead(400).end("topic required\n");
        return;
      }
      const body = Buffer.concat(chunks).toString("utf8");
      const set = topics.get(topic);
      if (set) for (const ws of set) ws.send(body);
      res.writeHead(200, { "content-type": "text/plain" }).end("ok\n");
    });
    return;
  }
  res.writeHead(404).end("not found\n");
});

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });

server.on("upgrade", (req, socket, head) => {
  const url = new URL(req.url, "http://peer");
  if (url.pathname !== "/ws") {
    socket.end("HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n");
    return;
  }
  const wanted = url.searchParams.getAll("topic");
  if (wanted.length === 0) wanted.push("idle");
  wss.handleUpgrade(req, socket, head, (ws) => {
    for (const t of wanted) subscribe(ws, t);
    ws.on("close", () => {
      for (const t of wanted) unsubscribe(ws, t);
    });
    ws.on("error", () => {});
  });
});

server.keepAliveTimeout = 0; // keep the publisher's connection open
server.headersTimeout = 0;
server.requestTimeout = 0;
server.listen(port, host, () => console.log("ready"));
