//! What differs between servers under test, behind one small trait: how a client connects and
//! subscribes, how a delivery looks on the wire, and how a backend publishes.
//!
//! - [`Herald`]: `GET /ws/{project}` with a bearer JWT, a welcome frame, `subscribe` ops with
//!   acks, deliveries `{"type":"message",..,"data":<payload>}`, publishes on
//!   `POST /api/v1/publish` (and `/batch`).
//!   With `stomp`, STOMP 1.2 at `/stomp/{project}` instead (the JWT at the upgrade): `CONNECT`,
//!   `CONNECTED` as the welcome, `SUBSCRIBE` with a receipt per topic, `MESSAGE` deliveries.
//! - [`Peer`]: the minimal contract the peer servers under `benches/peers/` speak:
//!   `GET /ws?topic=A&topic=B` (no auth, subscribed on connect, no welcome: ready once the
//!   upgrade completes), `POST /publish?topic=T` sends the raw body to every subscriber of `T`
//!   as one text frame.
//!
//! The scenario code sees only [`Target`].

use std::sync::OnceLock;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Request};

use crate::auth::{Minter, TokenSpec};

/// Which server and how to reach it; serialisable so worker processes get the same target.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TargetSpec {
    /// A herald node.
    Herald {
        /// Client port, `ws://HOST:PORT`.
        ws: String,
        /// API port, `http://HOST:PORT`.
        api: String,
        /// Project the connections belong to.
        project: String,
        /// How to sign the connections' tokens.
        token: TokenSpec,
        /// Bearer key for the publish API (project key or admin key).
        api_key: Option<String>,
        /// When set, connections use this many distinct users (`sub`) in turn, and their
        /// tokens are signed once each and reused (handshake and churn runs).
        token_pool: Option<usize>,
        /// Speak STOMP rather than herald.v1.
        #[serde(default)]
        stomp: bool,
    },
    /// A peer server speaking the minimal common contract.
    Peer {
        /// Client port, `ws://HOST:PORT`.
        ws: String,
        /// Publish port, `http://HOST:PORT` (may be the same as the client port).
        api: String,
    },
}

impl TargetSpec {
    /// Builds the live target.
    ///
    /// # Errors
    /// A token key that cannot be loaded.
    pub fn build(&self) -> Result<Box<dyn Target>> {
        Ok(match self {
            Self::Herald {
                ws,
                project,
                token,
                api_key,
                token_pool,
                stomp,
                ..
            } => Box::new(Herald {
                ws: ws.trim_end_matches('/').to_owned(),
                project: project.clone(),
                minter: Minter::new(token)?,
                api_key: api_key.clone(),
                pool: token_pool.map(|n| (0..n.max(1)).map(|_| OnceLock::new()).collect()),
                stomp: *stomp,
            }),
            Self::Peer { ws, .. } => Box::new(Peer {
                ws: ws.trim_end_matches('/').to_owned(),
            }),
        })
    }
}

/// What the bench publishes and the receivers read back: publish number, sequence number in
/// its topic, and the publish time on the shared monotonic clock (ns since bench start).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Payload {
    /// Publish number: index into the run's publish plan.
    pub k: u64,
    /// Sequence number within the topic (the round).
    pub s: u64,
    /// Publish time, ns since the bench's epoch.
    pub t: u64,
}

/// A server frame, as far as the bench cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// The server's greeting: the connection is ready.
    Welcome,
    /// Ack of the op with this id.
    Ack(u64),
    /// An error reply, with its code.
    Error(String),
    /// A published message.
    Delivery(Payload),
    /// Anything else (pongs, unknown types).
    Other,
}

/// One HTTP publish request.
#[derive(Debug)]
pub struct PublishRequest {
    /// Path and query.
    pub path: String,
    /// Request body.
    pub body: String,
    /// Extra headers (authorization, content type).
    pub headers: Vec<(&'static str, String)>,
}

/// A server under test.
pub trait Target: Send + Sync {
    /// The user (`sub`) of connection number `conn`; unicast topics are `user.<sub>`.
    fn sub(&self, conn: u64) -> String;
    /// The upgrade request of connection `conn`, which must end up receiving `topics`.
    ///
    /// # Errors
    /// A token could not be signed.
    fn ws_request(&self, conn: u64, topics: &[String]) -> Result<Request<()>>;
    /// The frame the client sends right after the upgrade, if any (STOMP's `CONNECT`).
    fn hello(&self) -> Option<String> {
        None
    }
    /// Whether the server sends a welcome frame that marks the connection ready.
    fn has_welcome(&self) -> bool;
    /// The frame subscribing to `topic` after the upgrade, or `None` when the target
    /// subscribes on connect (peers) or implicitly (herald's `user.<sub>`).
    fn subscribe_op(&self, topic: &str, id: u64) -> Option<String>;
    /// Reads a text frame from the server.
    fn classify(&self, text: &str) -> Frame;
    /// The request publishing `items` (`(topic, payload JSON)`), at most
    /// [`Target::max_batch`] of them.
    fn publish_request(&self, items: &[(String, String)]) -> PublishRequest;
    /// Most publishes one request may carry.
    fn max_batch(&self) -> usize;
    /// Does up-front work that must not be timed (signing pooled tokens).
    ///
    /// # Errors
    /// A token could not be signed.
    fn warm(&self) -> Result<()> {
        Ok(())
    }
}

/// herald (see the module doc).
pub struct Herald {
    ws: String,
    project: String,
    minter: Minter,
    api_key: Option<String>,
    /// Tokens signed once per pooled user, when pooling.
    pool: Option<Vec<OnceLock<String>>>,
    /// Speak STOMP (see the module doc).
    stomp: bool,
}

/// A STOMP server frame, as far as the bench cares: `CONNECTED` is the welcome, a `RECEIPT`
/// acks the `SUBSCRIBE` whose receipt id is its number, a `MESSAGE` body is the payload.
fn classify_stomp(text: &str) -> Frame {
    let Some((head, body)) = text.split_once("\n\n") else {
        return Frame::Other;
    };
    let mut lines = head.lines();
    let header = |name: &str| {
        head.lines()
            .skip(1)
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
    };
    match lines.next() {
        Some("CONNECTED") => Frame::Welcome,
        Some("RECEIPT") => Frame::Ack(
            header("receipt-id")
                .and_then(|r| r.parse().ok())
                .unwrap_or(u64::MAX),
        ),
        Some("ERROR") => Frame::Error(header("message").unwrap_or_default().to_owned()),
        Some("MESSAGE") => {
            serde_json::from_str(body.trim_end_matches('\0')).map_or(Frame::Other, Frame::Delivery)
        }
        _ => Frame::Other,
    }
}

#[derive(Deserialize)]
struct HeraldFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    data: Option<Payload>,
}

impl Target for Herald {
    fn sub(&self, conn: u64) -> String {
        match &self.pool {
            Some(p) => format!("b{}", conn % p.len() as u64),
            None => format!("b{conn}"),
        }
    }

    fn ws_request(&self, conn: u64, _topics: &[String]) -> Result<Request<()>> {
        let sub = self.sub(conn);
        let token = match &self.pool {
            Some(p) => {
                let slot = &p[(conn % p.len() as u64) as usize];
                match slot.get() {
                    Some(t) => t.clone(),
                    None => {
                        let t = self.minter.mint(&sub)?;
                        slot.get_or_init(|| t).clone()
                    }
                }
            }
            None => self.minter.mint(&sub)?,
        };
        let path = if self.stomp { "stomp" } else { "ws" };
        let mut req = format!("{}/{path}/{}", self.ws, self.project)
            .into_client_request()
            .context("client URL")?;
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).context("token header")?,
        );
        Ok(req)
    }

    fn hello(&self) -> Option<String> {
        // The token went with the upgrade; the client wants no heart-beats (an idle bench).
        self.stomp
            .then(|| "CONNECT\naccept-version:1.2\nheart-beat:0,0\n\n\0".to_owned())
    }

    fn has_welcome(&self) -> bool {
        true
    }

    fn subscribe_op(&self, topic: &str, id: u64) -> Option<String> {
        if self.stomp {
            // A STOMP connection receives only what it subscribes to, `all` and its own
            // `user.<sub>` included.
            let destination = if topic.starts_with("user.") {
                "/user/queue/notice".to_owned()
            } else {
                format!("/topic/{topic}")
            };
            return Some(format!(
                "SUBSCRIBE\nid:{id}\ndestination:{destination}\nreceipt:{id}\n\n\0"
            ));
        }
        // `all` and `user.*` are implicit in herald; explicit subscribes to `user.*` are refused.
        if topic == "all" || topic.starts_with("user.") || topic.starts_with("device.") {
            return None;
        }
        Some(serde_json::json!({"op": "subscribe", "topic": topic, "id": id}).to_string())
    }

    fn classify(&self, text: &str) -> Frame {
        if self.stomp {
            return classify_stomp(text);
        }
        let Ok(f) = serde_json::from_str::<HeraldFrame>(text) else {
            return Frame::Other;
        };
        match f.kind {
            "message" => f.data.map_or(Frame::Other, Frame::Delivery),
            "welcome" => Frame::Welcome,
            "ack" => Frame::Ack(f.id.and_then(|v| v.as_u64()).unwrap_or(u64::MAX)),
            "error" => Frame::Error(f.code.unwrap_or_default()),
            _ => Frame::Other,
        }
    }

    fn publish_request(&self, items: &[(String, String)]) -> PublishRequest {
        let body_of = |(topic, data): &(String, String)| {
            format!(
                r#"{{"project":{},"topic":{},"data":{}}}"#,
                serde_json::Value::from(self.project.as_str()),
                serde_json::Value::from(topic.as_str()),
                data
            )
        };
        let (path, body) = if items.len() == 1 {
            ("/api/v1/publish".to_owned(), body_of(&items[0]))
        } else {
            let parts: Vec<String> = items.iter().map(body_of).collect();
            (
                "/api/v1/publish/batch".to_owned(),
                format!("[{}]", parts.join(",")),
            )
        };
        let mut headers = vec![("content-type", "application/json".to_owned())];
        if let Some(k) = &self.api_key {
            headers.push(("authorization", format!("Bearer {k}")));
        }
        PublishRequest {
            path,
            body,
            headers,
        }
    }

    fn max_batch(&self) -> usize {
        1000
    }

    fn warm(&self) -> Result<()> {
        if let Some(p) = &self.pool {
            for (i, slot) in p.iter().enumerate() {
                if slot.get().is_none() {
                    let t = self.minter.mint(&format!("b{i}"))?;
                    let _ = slot.set(t);
                }
            }
        }
        Ok(())
    }
}

/// A peer server (see the module doc).
pub struct Peer {
    ws: String,
}

/// Percent-encodes a query value (topics are `[A-Za-z0-9_.:*-]` in practice).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Target for Peer {
    fn sub(&self, conn: u64) -> String {
        format!("b{conn}")
    }

    fn ws_request(&self, _conn: u64, topics: &[String]) -> Result<Request<()>> {
        // The contract subscribes on connect: an idle connection still names a topic.
        let idle = ["idle".to_owned()];
        let topics = if topics.is_empty() { &idle[..] } else { topics };
        let query: Vec<String> = topics
            .iter()
            .map(|t| format!("topic={}", query_escape(t)))
            .collect();
        let url = if query.is_empty() {
            format!("{}/ws", self.ws)
        } else {
            format!("{}/ws?{}", self.ws, query.join("&"))
        };
        url.into_client_request().context("client URL")
    }

    fn has_welcome(&self) -> bool {
        false
    }

    fn subscribe_op(&self, _topic: &str, _id: u64) -> Option<String> {
        None
    }

    fn classify(&self, text: &str) -> Frame {
        serde_json::from_str::<Payload>(text).map_or(Frame::Other, Frame::Delivery)
    }

    fn publish_request(&self, items: &[(String, String)]) -> PublishRequest {
        let (topic, data) = &items[0];
        PublishRequest {
            path: format!("/publish?topic={}", query_escape(topic)),
            body: data.clone(),
            headers: vec![("content-type", "application/json".to_owned())],
        }
    }

    fn max_batch(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn herald() -> Box<dyn Target> {
        herald_speaking(false)
    }

    fn herald_speaking(stomp: bool) -> Box<dyn Target> {
        TargetSpec::Herald {
            ws: "ws://127.0.0.1:1/".into(),
            api: "http://127.0.0.1:2".into(),
            project: "p".into(),
            token: TokenSpec {
                alg: "HS256".into(),
                secret: Some("0123456789abcdef".into()),
                key_pem: None,
                kid: None,
                ttl_secs: 60,
            },
            api_key: Some("key".into()),
            token_pool: Some(2),
            stomp,
        }
        .build()
        .unwrap()
    }

    #[test]
    fn herald_stomp_frames() {
        let h = herald_speaking(true);
        assert_eq!(h.ws_request(1, &[]).unwrap().uri().path(), "/stomp/p");
        assert!(h.hello().unwrap().starts_with("CONNECT\n"));
        assert_eq!(
            h.classify("CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0"),
            Frame::Welcome
        );
        assert_eq!(h.classify("RECEIPT\nreceipt-id:4\n\n\0"), Frame::Ack(4));
        assert_eq!(
            h.classify(
                "MESSAGE\nsubscription:0\ndestination:/topic/all\nmessage-id:m\n\
                 content-type:application/json\ncontent-length:22\n\n{\"k\":3,\"s\":1,\"t\":99}\0"
            ),
            Frame::Delivery(Payload { k: 3, s: 1, t: 99 })
        );
        assert_eq!(
            h.classify("ERROR\nmessage:no\n\nno\0"),
            Frame::Error("no".into())
        );
        assert_eq!(h.classify("\n"), Frame::Other);
        assert_eq!(
            h.subscribe_op("all", 0).unwrap(),
            "SUBSCRIBE\nid:0\ndestination:/topic/all\nreceipt:0\n\n\0"
        );
        assert!(
            h.subscribe_op("user.b1", 1)
                .unwrap()
                .contains("/user/queue/notice")
        );
    }

    #[test]
    fn herald_frames() {
        let h = herald();
        assert_eq!(
            h.classify(
                r#"{"type":"message","topic":"x","data":{"k":3,"s":1,"t":99},"id":"a","ts":1}"#
            ),
            Frame::Delivery(Payload { k: 3, s: 1, t: 99 })
        );
        assert_eq!(h.classify(r#"{"type":"ack","id":7}"#), Frame::Ack(7));
        assert_eq!(
            h.classify(r#"{"type":"welcome","conn":"0-1-1","project":"p","user":"b1","exp":1,"heartbeat":25}"#),
            Frame::Welcome
        );
        assert_eq!(
            h.classify(r#"{"type":"error","id":1,"code":"limit","message":"m"}"#),
            Frame::Error("limit".into())
        );
        assert!(h.subscribe_op("user.b1", 1).is_none());
        assert!(h.subscribe_op("g1", 1).unwrap().contains(r#""topic":"g1""#));
        assert_eq!(h.sub(5), "b1");
        let r = h.ws_request(5, &[]).unwrap();
        assert_eq!(r.uri().path(), "/ws/p");
        assert!(
            r.headers()["authorization"]
                .to_str()
                .unwrap()
                .starts_with("Bearer ")
        );
        // Pooled tokens are signed once.
        assert_eq!(
            h.ws_request(1, &[]).unwrap().headers()["authorization"],
            r.headers()["authorization"]
        );
        let one = h.publish_request(&[("t".into(), r#"{"k":0}"#.into())]);
        assert_eq!(one.path, "/api/v1/publish");
        assert_eq!(one.body, r#"{"project":"p","topic":"t","data":{"k":0}}"#);
        let two = h.publish_request(&[("a".into(), "1".into()), ("b".into(), "2".into())]);
        assert_eq!(two.path, "/api/v1/publish/batch");
        assert!(two.body.starts_with('[') && two.body.ends_with(']'));
    }

    #[test]
    fn peer_contract() {
        let p = TargetSpec::Peer {
            ws: "ws://127.0.0.1:1".into(),
            api: "http://127.0.0.1:1".into(),
        }
        .build()
        .unwrap();
        let r = p.ws_request(0, &["user.b0".into(), "g:0".into()]).unwrap();
        assert_eq!(r.uri().query(), Some("topic=user.b0&topic=g%3A0"));
        assert_eq!(
            p.classify(r#"{"k":1,"s":2,"t":3}"#),
            Frame::Delivery(Payload { k: 1, s: 2, t: 3 })
        );
        assert_eq!(
            p.publish_request(&[("a b".into(), "{}".into())]).path,
            "/publish?topic=a%20b"
        );
    }
}
