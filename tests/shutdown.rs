//! The real binary: SIGTERM drains (close 1001 to every client, exit 0 within the drain
//! time), and the CLI commands `check-config`, `genconfig` and `token`.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// `server.drain_timeout_ms` of the spawned server.
const DRAIN: Duration = Duration::from_millis(3000);

/// The test projects as a TOML config file.
fn config_toml(state_dir: &Path) -> String {
    format!(
        r#"[server]
shards = 2
pin_cores = false
drain_timeout_ms = {drain}
state_dir = "{state}"

[api]
admin_key = "{ADMIN_KEY}"

[log]
level = "warn"

[[projects]]
id = "shop"
api_key = "{SHOP_API_KEY}"

[[projects.keys]]
kid = "k1"
alg = "HS256"
secret = "{SHOP_SECRET}"

[[projects]]
id = "blog"
api_key = "{BLOG_API_KEY}"

[[projects.keys]]
kid = "k1"
alg = "HS256"
secret = "{BLOG_SECRET}"
"#,
        drain = DRAIN.as_millis(),
        state = state_dir.display(),
    )
}

#[test]
fn sigterm_closes_every_client_with_1001_and_exits_0() {
    let dir = TempDir::new("sigterm");
    let (mut server, ready) = HeraldProcess::start(&dir, &config_toml(&dir.0.join("state")), &[]);
    let (listen, api, ready) = (ready.listen, ready.api, ready.line);

    // The one ready line: exactly these fields, real ports.
    let obj = ready.as_object().expect("JSON object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["api_listen", "event", "listen", "shards"], "{ready}");
    assert_eq!(ready["event"], "ready");
    assert_eq!(ready["shards"], 2);
    assert!(listen.ip().is_loopback() && listen.port() != 0, "{ready}");
    assert!(
        api.ip().is_loopback() && api.port() != 0 && api != listen,
        "{ready}"
    );

    let mut clients: Vec<Client> = ["alice", "bob", "carol"]
        .iter()
        .map(|u| connect_user(listen, if *u == "bob" { "blog" } else { "shop" }, u).0)
        .collect();
    // The API serves the same node.
    let r = publish(
        api,
        SHOP_API_KEY,
        r#"{"project":"shop","topic":"all","data":1}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // alice and carol are in shop (every other client).
    for ws in clients.iter_mut().step_by(2) {
        let (_, data, _, _) = split_message(&recv_text(ws));
        assert_eq!(data, "1");
    }

    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(server.pid(), libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let signalled = Instant::now();
    for ws in &mut clients {
        let (code, reason) = expect_close(ws);
        assert_eq!(code, 1001, "{reason}");
    }
    let status = server.wait(DRAIN + Duration::from_secs(5));
    assert!(status.success(), "exit status {status:?}");
    // Every client answered the close, so the drain ends before its timeout.
    assert!(
        signalled.elapsed() < DRAIN,
        "exit took {:?}",
        signalled.elapsed()
    );
    assert_eq!(
        server.extra_stdout(),
        Vec::<String>::new(),
        "one line on stdout"
    );
    // Nothing listens any more.
    assert!(std::net::TcpStream::connect_timeout(&listen, TIMEOUT).is_err());
}

#[test]
fn drain_exits_even_when_clients_do_not_answer() {
    let dir = TempDir::new("deaf");
    let (mut server, ready) = HeraldProcess::start(&dir, &config_toml(&dir.0.join("state")), &[]);
    let listen = ready.listen;
    // A raw client that never answers the close frame.
    let (mut deaf, _) = RawClient::upgrade(listen, "shop", &token("shop", "deaf").0);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGTERM) }, 0);
    assert_eq!(deaf.expect_close().0, 1001);
    let status = server.wait(DRAIN + Duration::from_secs(5));
    assert!(status.success(), "exit status {status:?}");
    deaf.expect_eof();
}

#[test]
fn sigterm_right_after_the_ready_line_drains() {
    // The ready line promises a serving process: a SIGTERM sent the moment it is read must
    // drain and exit 0, not kill the process with the default signal action. Repeated, since
    // a window between the ready line and the signal handlers is narrow.
    let dir = TempDir::new("early-term");
    let config = config_toml(&dir.0.join("state"));
    for _ in 0..25 {
        let (mut server, ready) = HeraldProcess::start(&dir, &config, &[]);
        assert_eq!(ready.line["event"], "ready");
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGTERM) }, 0);
        let status = server.wait(DRAIN + Duration::from_secs(5));
        assert!(status.success(), "exit status {status:?}");
    }
}

/// One request on a kept-alive connection; `None` once the server is gone.
fn keep_alive(s: &mut std::net::TcpStream, request: &[u8]) -> Option<HttpResponse> {
    use std::io::Write;
    s.write_all(request).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(r) = parse_http(&buf) {
            return Some(r);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Publishes to `all` of shop as fast as one kept-alive API connection allows until a publish
/// is refused (503 with one of `refusals`) or the server goes; returns the ids of the
/// publishes answered 200.
fn publish_until_refused(
    api: std::net::SocketAddr,
    publisher: usize,
    count: &std::sync::atomic::AtomicUsize,
    refusals: &[&str],
) -> Vec<String> {
    let mut s = tcp(api);
    let mut accepted = Vec::new();
    for n in 0.. {
        let body = format!(r#"{{"project":"shop","topic":"all","data":[{publisher},{n}]}}"#);
        let req = format!(
            "POST /api/v1/publish HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer \
             {SHOP_API_KEY}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let Some(r) = keep_alive(&mut s, req.as_bytes()) else {
            break;
        };
        if r.status == 429 {
            // Over the key's request rate while the server takes its time to go: slow down.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if r.status != 200 {
            assert_eq!(r.status, 503, "{}", r.text());
            let code = r.json()["error"].as_str().unwrap_or_default().to_owned();
            assert!(refusals.contains(&code.as_str()), "{}", r.text());
            break;
        }
        accepted.push(r.json()["id"].as_str().expect("id").to_owned());
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    accepted
}

/// A thread reading `ws` until its close (which must be 1001); answers the message ids it got.
fn read_ids_until_1001(mut ws: Client) -> std::thread::JoinHandle<BTreeSet<String>> {
    std::thread::spawn(move || {
        let (texts, code, reason) = read_until_close(&mut ws);
        assert_eq!(code, 1001, "{reason}");
        texts.iter().map(|t| split_message(t).2).collect()
    })
}

type Publishers = Vec<std::thread::JoinHandle<Vec<String>>>;

/// Three threads running [`publish_until_refused`], and the count of their accepted publishes.
fn start_publishers(
    api: std::net::SocketAddr,
    refusals: &'static [&'static str],
) -> (std::sync::Arc<std::sync::atomic::AtomicUsize>, Publishers) {
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publishers = (0..3)
        .map(|p| {
            let count = count.clone();
            std::thread::spawn(move || publish_until_refused(api, p, &count, refusals))
        })
        .collect();
    (count, publishers)
}

#[test]
fn every_publish_answered_200_around_sigterm_reaches_every_open_connection() {
    let dir = TempDir::new("term-race");
    let config = config_toml(&dir.0.join("state"));
    for trial in 0..5 {
        let (mut server, ready) = HeraldProcess::start(&dir, &config, &[]);
        let (listen, api) = (ready.listen, ready.api);
        // Subscribers (of `all`) read until their close and report the ids they got.
        let readers: Vec<_> = (0..6)
            .map(|i| read_ids_until_1001(connect_user(listen, "shop", &format!("u{i}")).0))
            .collect();
        let (count, publishers) = start_publishers(api, &["draining"]);
        // SIGTERM in the middle of the stream of publishes, at a different point each trial.
        wait_until("publishes to flow", || {
            count.load(std::sync::atomic::Ordering::Relaxed) >= 50 * (trial + 1)
        });
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGTERM) }, 0);
        let accepted: Vec<String> = publishers
            .into_iter()
            .flat_map(|t| t.join().expect("publisher"))
            .collect();
        for r in readers {
            let got = r.join().expect("reader");
            let lost: Vec<&String> = accepted.iter().filter(|id| !got.contains(*id)).collect();
            assert!(
                lost.is_empty(),
                "trial {trial}: {} of {} publishes answered 200 never arrived: {lost:?}",
                lost.len(),
                accepted.len()
            );
        }
        let status = server.wait(DRAIN + Duration::from_secs(5));
        assert!(status.success(), "exit status {status:?}");
    }
}

/// `GET path`; `None` once the server is gone.
fn try_get(addr: std::net::SocketAddr, path: &str) -> Option<HttpResponse> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, TIMEOUT).ok()?;
    set_timeouts(&s);
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    keep_alive(&mut s, req.as_bytes())
}

#[test]
fn a_shard_that_panics_fails_readiness_and_the_process_exits_non_zero() {
    let dir = TempDir::new("shard-panic");
    let trigger = dir.0.join("panic");
    let (mut server, ready) = HeraldProcess::start(
        &dir,
        &config_toml(&dir.0.join("state")),
        &[("HERALD_TEST_PANIC_FILE", trigger.as_os_str())],
    );
    let (listen, api) = (ready.listen, ready.api);
    let r = try_get(api, "/readyz").expect("readyz");
    assert_eq!(r.status, 200, "{}", r.text());
    // A client of the surviving shard that never answers its close frame keeps the drain,
    // and so the process, going for up to the drain timeout.
    let mut deaf = (0..64)
        .map(|_| RawClient::upgrade(listen, "shop", &token("shop", "deaf").0))
        .find(|(_, w)| w.shard == 0)
        .expect("a connection on shard 0")
        .0;

    std::fs::write(&trigger, "1").expect("trigger");
    // Not ready from the failure until the process ends.
    let start = Instant::now();
    let mut saw_failed = false;
    while server.child.try_wait().expect("try_wait").is_none() {
        assert!(start.elapsed() < TIMEOUT, "still running and ready");
        if let Some(r) = try_get(api, "/readyz")
            && r.status == 503
        {
            assert_eq!(r.json()["status"], "failed", "{}", r.text());
            saw_failed = true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(saw_failed, "/readyz never answered 503 `failed`");
    // The surviving shard's clients are told to go elsewhere.
    assert_eq!(deaf.expect_close().0, 1001);
    let status = server.wait(DRAIN + Duration::from_secs(5));
    assert_eq!(status.code(), Some(70), "exit status {status:?}");
    let stderr = server.stderr();
    assert!(
        stderr.contains("shard 1 panics") && stderr.contains("exiting with status 70"),
        "{stderr}"
    );
}

/// A shard that panics while publishes stream in: every publish answered 200 reaches the
/// surviving shard's connections before their 1001, and none refused (503 `failed` or
/// `draining`, "nothing was sent") reaches any.
#[test]
fn a_publish_refused_around_a_shard_panic_reached_no_connection() {
    let dir = TempDir::new("panic-race");
    let config = config_toml(&dir.0.join("state"));
    let trigger = dir.0.join("panic");
    for trial in 0..3 {
        let _ = std::fs::remove_file(&trigger);
        let (mut server, ready) = HeraldProcess::start(
            &dir,
            &config,
            &[("HERALD_TEST_PANIC_FILE", trigger.as_os_str())],
        );
        let (listen, api) = (ready.listen, ready.api);
        // Subscribers (of `all`) on shard 0, which survives, read until their close.
        let mut on_shard_0 = Vec::new();
        for i in 0..64 {
            let (ws, w) = connect_user(listen, "shop", &format!("u{i}"));
            if w.shard == 0 {
                on_shard_0.push(ws);
            }
            if on_shard_0.len() == 3 {
                break;
            }
        }
        assert!(!on_shard_0.is_empty(), "no connection on shard 0");
        let readers: Vec<_> = on_shard_0.into_iter().map(read_ids_until_1001).collect();
        let (count, publishers) = start_publishers(api, &["failed", "draining"]);
        wait_until("publishes to flow", || {
            count.load(std::sync::atomic::Ordering::Relaxed) >= 50 * (trial + 1)
        });
        std::fs::write(&trigger, "1").expect("trigger");
        let accepted: BTreeSet<String> = publishers
            .into_iter()
            .flat_map(|t| t.join().expect("publisher"))
            .collect();
        for r in readers {
            let got = r.join().expect("reader");
            let lost: Vec<&String> = accepted.difference(&got).collect();
            assert!(
                lost.is_empty(),
                "trial {trial}: {} of {} publishes answered 200 never arrived: {lost:?}",
                lost.len(),
                accepted.len()
            );
            let refused: Vec<&String> = got.difference(&accepted).collect();
            assert!(
                refused.is_empty(),
                "trial {trial}: publishes answered 503 were delivered: {refused:?}"
            );
        }
        let status = server.wait(DRAIN + Duration::from_secs(5));
        assert_eq!(status.code(), Some(70), "exit status {status:?}");
    }
}

/// Waits for a background join, at most `limit`.
fn join_within(t: std::thread::JoinHandle<()>, limit: Duration) -> Duration {
    let start = Instant::now();
    while !t.is_finished() {
        assert!(start.elapsed() < limit, "server not joined after {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    t.join().expect("server thread");
    start.elapsed()
}

fn in_process_drain(driver: herald::config::IoDriver) {
    let server = TestServer::start(|c| {
        c.server.io_driver = driver;
        c.server.drain_timeout_ms = DRAIN.as_millis() as u64;
    });
    // Both shards hold clients.
    let mut clients = connect_spread(server.listen, "shop", "u", 8);
    let hub = server.hub.clone();
    let joined = server.drain_in_background();
    // Each client gets 1001, answers, and sees the server close the socket (EOF).
    for (ws, w) in &mut clients {
        let (code, reason) = expect_close(ws);
        assert_eq!(
            (code, reason.as_str()),
            (1001, "server shutting down"),
            "{}",
            w.conn
        );
    }
    // Every client answered, so the shards end before the drain timeout.
    let waited = join_within(joined, DRAIN + Duration::from_secs(5));
    assert!(waited < DRAIN, "join took {waited:?}");
    assert_eq!(hub.phase(), herald::hub::Phase::Stopped);
}

#[test]
fn in_process_drain_closes_every_socket_io_uring() {
    in_process_drain(herald::config::IoDriver::Auto);
}

#[test]
fn in_process_drain_closes_every_socket_epoll() {
    in_process_drain(herald::config::IoDriver::Legacy);
}

#[test]
fn in_process_drain_timeout_drops_deaf_clients() {
    let server = TestServer::start(|c| c.server.drain_timeout_ms = 500);
    let (mut deaf, _) = RawClient::upgrade(server.listen, "shop", &token("shop", "deaf").0);
    let joined = server.drain_in_background();
    assert_eq!(deaf.expect_close().0, 1001);
    // Never answered: dropped at the drain timeout, socket closed.
    let waited = deaf.expect_eof();
    assert!(waited < Duration::from_secs(3), "EOF after {waited:?}");
    join_within(joined, Duration::from_secs(5));
}

#[test]
fn check_config_names_a_mistyped_key() {
    let dir = TempDir::new("typo");
    let good = config_toml(&dir.0.join("state"));
    let path = dir.write("good.toml", &good);
    let (status, out, err) = run_herald(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(status.success(), "{out}{err}");

    let typo = good.replace("drain_timeout_ms", "drain_timout_ms");
    let path = dir.write("typo.toml", &typo);
    let (status, out, err) = run_herald(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!status.success(), "accepted a typo: {out}");
    assert!(
        err.contains("drain_timout_ms"),
        "stderr does not name the key: {err}"
    );

    let bad_value = good.replace("alg = \"HS256\"", "alg = \"HS999\"");
    let path = dir.write("alg.toml", &bad_value);
    let (status, _, err) = run_herald(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!status.success());
    assert!(err.contains("alg"), "stderr does not name the key: {err}");
}

#[test]
fn genconfig_output_passes_check_config() {
    let dir = TempDir::new("genconfig");
    let (status, generated, err) = run_herald(&["genconfig"]);
    assert!(status.success(), "{err}");
    let path = dir.write("generated.toml", &generated);
    let (status, out, err) = run_herald(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(status.success(), "generated config refused: {out}{err}");
    // Two runs make different secrets.
    let (_, again, _) = run_herald(&["genconfig"]);
    assert_ne!(generated, again);
}

#[test]
fn token_command_output_verifies_with_jsonwebtoken() {
    let dir = TempDir::new("token");
    let path = dir.write("herald.toml", &config_toml(&dir.0.join("state")));
    let (status, out, err) = run_herald(&[
        "token",
        "--config",
        path.to_str().unwrap(),
        "--project",
        "shop",
        "--sub",
        "alice",
        "--ttl",
        "600",
        "--topics",
        "news,chat.*",
        "--device",
        "phone-1",
    ]);
    assert!(status.success(), "{err}");
    let jwt = out.trim();
    assert_eq!(out, format!("{jwt}\n"), "one line");
    let header = jsonwebtoken::decode_header(jwt).expect("JWT header");
    assert_eq!(header.alg, Algorithm::HS256);
    assert_eq!(header.kid.as_deref(), Some("k1"));
    let mut v = Validation::new(Algorithm::HS256);
    v.set_required_spec_claims(&["sub", "exp"]);
    let claims =
        jsonwebtoken::decode::<Value>(jwt, &DecodingKey::from_secret(SHOP_SECRET.as_bytes()), &v)
            .expect("verifies with shop's secret")
            .claims;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["topics"], serde_json::json!(["news", "chat.*"]));
    assert_eq!(claims["device"], "phone-1");
    let exp = claims["exp"].as_u64().expect("numeric exp");
    let now = now_secs();
    assert!(
        exp > now + 590 && exp <= now + 600,
        "exp {exp} vs now {now}"
    );
    // Not with blog's.
    assert!(
        jsonwebtoken::decode::<Value>(jwt, &DecodingKey::from_secret(BLOG_SECRET.as_bytes()), &v)
            .is_err()
    );
}
