//! `recover`: N clients of a topic with history leave, M messages are published while they are
//! away, then all of them reconnect at once with `since`. Measures how long the node takes to
//! give every client what it missed (connect, upgrade, recovered subscribe, M replayed
//! messages), and checks each got exactly M, in order, with `"recovered":true`. With
//! `--reconnect-url` they come back to another node of a cluster, which recovers them from the
//! stream in Redis.
//!
//! Needs a herald whose project keeps history of the topic (`[[projects.history]]` with a
//! `size` of at least M, and `server.history_max_replay` at least M).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::auth::{self, Minter, TokenSpec};
use crate::cli::RecoverArgs;

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Where one client stands: its stream's epoch and the last offset it saw.
#[derive(Clone)]
struct Position {
    epoch: String,
    offset: u64,
}

/// What the run measured, printed as JSON.
#[derive(serde::Serialize)]
struct Report {
    clients: u64,
    messages: u64,
    /// From the first reconnect to the last client holding all M messages.
    recovery_secs: f64,
    /// Per client, from its reconnect to its M-th message.
    client_ms_p50: f64,
    client_ms_p99: f64,
    client_ms_max: f64,
    /// Clients that got every message exactly once, in order, recovered.
    complete: u64,
    /// Clients that failed, by reason.
    failed: std::collections::BTreeMap<String, u64>,
}

/// Runs the scenario.
///
/// # Errors
/// The config cannot be read, or the first phase (subscribe, publish) fails.
pub async fn run(a: RecoverArgs) -> Result<()> {
    let facts = auth::read_herald_config(&a.herald_config, a.project.as_deref())?;
    let (kid, alg, secret) = facts
        .key_for(None)
        .context("the project has no HS* key with a secret")?;
    let minter = Arc::new(Minter::new(&TokenSpec {
        alg,
        secret,
        key_pem: None,
        kid,
        ttl_secs: 3600,
    })?);
    let ws_addr = |url: &str| -> Result<SocketAddr> {
        url.trim_start_matches("ws://")
            .parse()
            .context("--url and --reconnect-url: ws://HOST:PORT")
    };
    let addr = ws_addr(&a.url)?;
    let back = ws_addr(a.reconnect_url.as_deref().unwrap_or(&a.url))?;
    let api: SocketAddr = a
        .api
        .trim_start_matches("http://")
        .parse()
        .context("--api http://HOST:PORT")?;
    let api_key = facts.api_key.clone().context("no API key in the config")?;
    let project = facts.project.clone();
    let n = a.connections;

    // Everyone subscribes once, learns the stream's position, and leaves.
    let mut positions = Vec::with_capacity(n as usize);
    let mut joins = tokio::task::JoinSet::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    for i in 0..n {
        let (minter, project, topic, gate) = (
            minter.clone(),
            project.clone(),
            a.topic.clone(),
            gate.clone(),
        );
        joins.spawn(async move {
            let _permit = gate.acquire().await;
            let mut ws = connect(addr, &project, &minter, i).await?;
            let ack = subscribe(&mut ws, &topic, None).await?;
            let _ = ws.close(None).await;
            position(&ack)
        });
    }
    while let Some(r) = joins.join_next().await {
        positions.push(r??);
    }
    eprintln!("recover: {n} clients subscribed and left");

    // M messages while they are away.
    for k in 1..=a.messages {
        let body = json!({"project": project, "topic": a.topic, "data": k}).to_string();
        publish(api, &api_key, &body).await?;
    }
    eprintln!("recover: {} messages published", a.messages);

    // Everyone back at once, with `since`.
    let start = Instant::now();
    let mut joins = tokio::task::JoinSet::new();
    for (i, p) in positions.into_iter().enumerate() {
        let (minter, project, topic) = (minter.clone(), project.clone(), a.topic.clone());
        let m = a.messages;
        joins.spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(120),
                recover_one(back, &project, &minter, i as u64, &topic, p, m),
            )
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("timeout")));
            r.map(|()| start.elapsed())
        });
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let mut report = Report {
        clients: n,
        messages: a.messages,
        recovery_secs: 0.0,
        client_ms_p50: 0.0,
        client_ms_p99: 0.0,
        client_ms_max: 0.0,
        complete: 0,
        failed: Default::default(),
    };
    while let Some(r) = joins.join_next().await {
        match r? {
            Ok(took) => {
                report.complete += 1;
                hist.record(took.as_micros() as u64)?;
            }
            Err(e) => *report.failed.entry(format!("{e:#}")).or_default() += 1,
        }
    }
    report.recovery_secs = start.elapsed().as_secs_f64();
    report.client_ms_p50 = hist.value_at_quantile(0.5) as f64 / 1000.0;
    report.client_ms_p99 = hist.value_at_quantile(0.99) as f64 / 1000.0;
    report.client_ms_max = hist.max() as f64 / 1000.0;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if report.complete != n {
        bail!("{} of {n} clients did not recover", n - report.complete);
    }
    Ok(())
}

async fn recover_one(
    addr: SocketAddr,
    project: &str,
    minter: &Minter,
    i: u64,
    topic: &str,
    since: Position,
    m: u64,
) -> Result<()> {
    let mut ws = connect(addr, project, minter, i).await?;
    let ack = subscribe(&mut ws, topic, Some(&since)).await?;
    if ack["recovered"] != true {
        bail!("not recovered: {}", ack["reason"]);
    }
    for k in 1..=m {
        let msg = next_json(&mut ws).await?;
        let want = since.offset + k;
        if msg["offset"] != want || msg["data"] != k {
            bail!("out of order: wanted offset {want}, got {msg}");
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

async fn connect(addr: SocketAddr, project: &str, minter: &Minter, i: u64) -> Result<Ws> {
    let token = minter.mint(&format!("r{i}"))?;
    let mut req = format!("ws://{addr}/ws/{project}").into_client_request()?;
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse()?);
    let tcp = TcpStream::connect(addr).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
    let welcome = next_json(&mut ws).await?;
    if welcome["type"] != "welcome" {
        bail!("no welcome: {welcome}");
    }
    Ok(ws)
}

async fn subscribe(ws: &mut Ws, topic: &str, since: Option<&Position>) -> Result<Value> {
    let mut op = json!({"op": "subscribe", "topic": topic, "id": 1});
    if let Some(p) = since {
        op["since"] = json!({"epoch": p.epoch, "offset": p.offset});
    }
    ws.send(Message::text(op.to_string())).await?;
    let ack = next_json(ws).await?;
    if ack["type"] != "ack" {
        bail!("subscribe refused: {ack}");
    }
    Ok(ack)
}

fn position(ack: &Value) -> Result<Position> {
    Ok(Position {
        epoch: ack["epoch"]
            .as_str()
            .context("no epoch: the topic has no history on this server")?
            .to_owned(),
        offset: ack["offset"].as_u64().context("no offset")?,
    })
}

async fn next_json(ws: &mut Ws) -> Result<Value> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str())?),
            Some(Ok(Message::Close(f))) => bail!("closed: {f:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("eof"),
        }
    }
}

/// One `POST /api/v1/publish`, answered 200.
async fn publish(api: SocketAddr, key: &str, body: &str) -> Result<()> {
    let mut s = TcpStream::connect(api).await?;
    let req = format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    if !answer.starts_with("HTTP/1.1 200") {
        bail!("publish refused: {answer}");
    }
    Ok(())
}
