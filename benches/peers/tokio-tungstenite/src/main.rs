//! Peer server for `benches/compare`: tokio (multi-thread) + hyper + tokio-tungstenite.
//!
//! The minimal peer contract, on one port (`PORT`):
//! - `GET /ws?topic=A&topic=B`: WebSocket upgrade, subscribed to every `topic` on connect;
//! - `POST /publish?topic=T`: the raw body goes to every subscriber of `T` as one text frame;
//!   answers 200.
//!
//! The usual tokio-tungstenite shape: a registry `topic -> {conn id -> sender}` behind a lock,
//! one unbounded channel and one writer task per connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

type Tx = mpsc::UnboundedSender<Message>;

#[derive(Default)]
struct Hub {
    topics: RwLock<HashMap<String, HashMap<u64, Tx>>>,
    next_id: AtomicU64,
}

impl Hub {
    fn subscribe(&self, id: u64, topics: &[String], tx: &Tx) {
        let mut map = self.topics.write().unwrap();
        for t in topics {
            map.entry(t.clone()).or_default().insert(id, tx.clone());
        }
    }

    fn unsubscribe(&self, id: u64, topics: &[String]) {
        let mut map = self.topics.write().unwrap();
        for t in topics {
            if let Some(subs) = map.get_mut(t) {
                subs.remove(&id);
                if subs.is_empty() {
                    map.remove(t);
                }
            }
        }
    }

    fn publish(&self, topic: &str, body: Bytes) -> usize {
        let Ok(text) = tokio_tungstenite::tungstenite::Utf8Bytes::try_from(body) else {
            return 0;
        };
        let msg = Message::Text(text);
        let map = self.topics.read().unwrap();
        let Some(subs) = map.get(topic) else {
            return 0;
        };
        for tx in subs.values() {
            let _ = tx.send(msg.clone());
        }
        subs.len()
    }
}

/// tungstenite's defaults (a 128 KiB read buffer per connection), unless `WS_READ_BUFFER`
/// (bytes) asks for a smaller one.
fn ws_config() -> Option<WebSocketConfig> {
    let bytes: usize = std::env::var("WS_READ_BUFFER").ok()?.parse().ok()?;
    Some(WebSocketConfig::default().read_buffer_size(bytes))
}

fn topics_of(req: &Request<Incoming>) -> Vec<String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .filter(|(k, _)| k == "topic")
        .map(|(_, v)| v.into_owned())
        .collect()
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

async fn handle(
    hub: Arc<Hub>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/publish") => {
            let topic = topics_of(&req).into_iter().next();
            let Some(topic) = topic else {
                return Ok(reply(StatusCode::BAD_REQUEST, "topic required\n"));
            };
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return Ok(reply(StatusCode::BAD_REQUEST, "bad body\n")),
            };
            hub.publish(&topic, body);
            Ok(reply(StatusCode::OK, "ok\n"))
        }
        (&Method::GET, "/ws") => {
            let key = req.headers().get(SEC_WEBSOCKET_KEY).cloned();
            let is_ws = req
                .headers()
                .get(UPGRADE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
            let (Some(key), true) = (key, is_ws) else {
                return Ok(reply(
                    StatusCode::BAD_REQUEST,
                    "websocket upgrade expected\n",
                ));
            };
            if req
                .headers()
                .get(SEC_WEBSOCKET_VERSION)
                .map(|v| v.as_bytes())
                != Some(b"13")
            {
                return Ok(reply(
                    StatusCode::BAD_REQUEST,
                    "websocket version 13 expected\n",
                ));
            }
            let mut topics = topics_of(&req);
            if topics.is_empty() {
                topics.push("idle".to_owned());
            }
            let accept = derive_accept_key(key.as_bytes());
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    ws_config(),
                )
                .await;
                serve_ws(hub, ws, topics).await;
            });
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = r.headers_mut();
            h.insert(UPGRADE, "websocket".parse().unwrap());
            h.insert(CONNECTION, "Upgrade".parse().unwrap());
            h.insert(SEC_WEBSOCKET_ACCEPT, accept.parse().unwrap());
            Ok(r)
        }
        _ => Ok(reply(StatusCode::NOT_FOUND, "not found\n")),
    }
}

async fn serve_ws<S>(hub: Arc<Hub>, ws: WebSocketStream<S>, topics: Vec<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    hub.subscribe(id, &topics, &tx);
    let (mut sink, mut stream) = ws.split();
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if sink.feed(msg).await.is_err() {
                return;
            }
            // Whatever is queued already goes out with the same flush.
            while let Ok(msg) = rx.try_recv() {
                if sink.feed(msg).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(Message::Ping(p)) => {
                let _ = tx.send(Message::Pong(p));
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    hub.unsubscribe(id, &topics);
    drop(tx);
    let _ = writer.await;
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(9000);
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".to_owned());
    let addr: SocketAddr = format!("{host}:{port}").parse().expect("HOST:PORT");
    let listener = TcpListener::bind(addr).await.expect("bind");
    let hub = Arc::new(Hub::default());
    println!("ready");
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let _ = sock.set_nodelay(true);
        let hub = hub.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(hub.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(sock), svc)
                .with_upgrades()
                .await;
        });
    }
}
