//! Project and key management through the API: a change builds only the project it
//! touches, and runs off the API runtime, so publishes and health checks of every tenant
//! are answered while keys churn.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use herald::config::{KeyConfig, ProjectConfig, Secret};
use p256::pkcs8::EncodePublicKey as _;
use rsa::pkcs8::LineEnding;
use rsa::rand_core::OsRng;

/// A 4096-bit RSA public key (made once with `openssl genrsa 4096`): heavy to load and
/// probe, so building many of them is real work.
const RSA_4096_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMIICIjANBgkqhkiG9w0BAQEFAAOCAg8AMIICCgKCAgEAxvVLGA7Wa3ha2JRdfNz+\nPSigQgDYOfnSEoo0lwbLon+T/wJeyT+6NfHjDUVB36IjwO6eaSgpPxjeLCuv4TB6\nASfSBnc9ULvtZqf81ndhZ0s5+nAm3kVr4xMPzTL/xh9SN/SPs9vsdc8XUMreT5s+\n2kcvuR3ZOW/xQ2LN6mXM7CuGBSU4p/npBN1TXBrJeV4QHWEkyKYzI2W6pGUIssuu\nDjipm57q8DCHkhp0r8l33/g5GR6h0GRRu9ilLtvWOST/x6LqTDFAwTYa+CYjwaIP\nQi33uT2GuojGJcdS/IXB1FPl21QFw9eAEbKJ9j3+fbEjm3nYHnkfHfJRJXwXIe/A\nqzsCpziW+3EZJsdqPFCB+BgXm8WPxi4GSi1nQQMAHf92EUeesXLCzv1BHSZvF8T2\nuo7t9boIiWE6t3bEjjVQLYvPYp8NqGxEw3ivdnoN6t73clZ6jiAAq3/z4qQaHuvD\nEHwNBRvM0gd29t/B/8JYLE3203JTaQJMjGW1MHHacHzmqxTe+kdj8k9m/zhlGpPG\ne/AUwfzHYOCvzPVbhz4+ZEemzEpF9EiBYbyWvNfMZw7u+ZYVH44FnMXTRZm0vJFw\nOQI2/aA7oe63mpu2q9Tk2OlltlNDwrXWuE4FdAC3ooE05W9Vw86kpDziefD2DzRk\nUlKLIquHK03YOIwUzHXM2gECAwEAAQ==\n-----END PUBLIC KEY-----\n";

/// An ES256 public key in PEM.
fn es256_public_pem() -> String {
    p256::SecretKey::random(&mut OsRng)
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("P-256 public PEM")
}

fn put_key(api: std::net::SocketAddr, bearer: &str, project: &str, kid: &str) -> HttpResponse {
    http_request(
        api,
        "PUT",
        &format!("/api/v1/projects/{project}/keys/{kid}"),
        bearer,
        r#"{"alg":"HS256","secret":"a-secret-of-enough-length-0123"}"#,
    )
}

fn delete_key(api: std::net::SocketAddr, bearer: &str, project: &str, kid: &str) -> HttpResponse {
    let path = format!("/api/v1/projects/{project}/keys/{kid}");
    http_request(api, "DELETE", &path, bearer, "")
}

#[test]
fn a_key_change_rebuilds_only_its_project() {
    let server = TestServer::start(|_| {});
    let before = server.hub.registry.load_full();
    let r = put_key(server.api, SHOP_API_KEY, "shop", "k2");
    assert_eq!(r.status, 204, "{}", r.text());
    let after = server.hub.registry.load_full();
    assert!(
        Arc::ptr_eq(
            before.project("blog").expect("blog"),
            after.project("blog").expect("blog")
        ),
        "blog's keys were rebuilt for a change to shop"
    );
    let shop = after.project("shop").expect("shop");
    assert!(!Arc::ptr_eq(before.project("shop").expect("shop"), shop));
    assert!(shop.keys.iter().any(|k| k.kid.as_deref() == Some("k2")));

    let r = http_request(
        server.api,
        "DELETE",
        "/api/v1/projects/shop/keys/k2?disconnect=true",
        SHOP_API_KEY,
        "",
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let last = server.hub.registry.load_full();
    assert!(Arc::ptr_eq(
        after.project("blog").expect("blog"),
        last.project("blog").expect("blog")
    ));
    assert!(
        !last
            .project("shop")
            .expect("shop")
            .keys
            .iter()
            .any(|k| k.kid.as_deref() == Some("k2"))
    );
}

#[test]
fn publishes_and_health_checks_are_answered_while_keys_churn() {
    // Many projects with big public keys, so building every project's keys is real work.
    let server = TestServer::start(|c| {
        for i in 0..3000 {
            c.projects.push(ProjectConfig {
                id: format!("tenant{i}"),
                api_key: Some(Secret(format!("tenant-{i}-api-key"))),
                keys: (0..3)
                    .map(|k| KeyConfig {
                        kid: Some(format!("e{k}")),
                        alg: "RS256".into(),
                        pem: Some(RSA_4096_PUBLIC.into()),
                        ..KeyConfig::default()
                    })
                    .collect(),
                ..ProjectConfig::default()
            });
        }
    });
    let api = server.api;
    let stop = Arc::new(AtomicBool::new(false));
    let churn: Vec<_> = (0..3)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let r = put_key(api, SHOP_API_KEY, "shop", &format!("churn{t}"));
                    assert_eq!(r.status, 204, "{}", r.text());
                    n += 1;
                }
                n
            })
        })
        .collect();
    let (mut health, mut published) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        let r = http(
            api,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!((r.status, r.text()), (200, r#"{"status":"ok"}"#.to_owned()));
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "/healthz took {:?}",
            t.elapsed()
        );
        health += 1;
        let t = Instant::now();
        let r = publish(
            api,
            BLOG_API_KEY,
            r#"{"project":"blog","topic":"news","data":1}"#,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.json()["id"].as_str().is_some_and(|id| !id.is_empty()));
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "publish took {:?}",
            t.elapsed()
        );
        published += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let puts: usize = churn
        .into_iter()
        .map(|h| h.join().expect("churn thread"))
        .sum();
    assert!(puts >= 3, "the key loop made {puts} changes");
    assert!(health > 0 && published > 0);
}

#[test]
fn projects_and_keys_can_be_read_back_without_secrets() {
    let server = TestServer::start(|_| {});
    let api = server.api;
    let get = |key: &str, path: &str| http_request(api, "GET", path, key, "");
    let hs = serde_json::json!([{"kid": "k1", "alg": "HS256", "kind": "hmac", "source": "config"}]);

    let r = get(ADMIN_KEY, "/api/v1/projects");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let all = r.json();
    let projects = all["projects"].as_array().expect("projects");
    let ids: Vec<&str> = projects.iter().filter_map(|p| p["id"].as_str()).collect();
    assert_eq!(ids, ["blog", "shop"]);
    for p in projects {
        assert_eq!(p["keys"], hs, "{p}");
        assert_eq!(p["source"], "config");
        assert_eq!(p["enabled"], true);
        assert_eq!(p["max_token_lifetime_secs"], 2_592_000);
        assert_eq!(p["revoked_kids"], serde_json::json!([]));
    }
    for secret in [
        SHOP_SECRET,
        BLOG_SECRET,
        SHOP_API_KEY,
        BLOG_API_KEY,
        ADMIN_KEY,
    ] {
        assert!(!r.text().contains(secret), "a secret in {}", r.text());
    }

    // A project key sees its own project only.
    let own = get(SHOP_API_KEY, "/api/v1/projects").json();
    let ids: Vec<&str> = own["projects"]
        .as_array()
        .expect("projects")
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(ids, ["shop"]);
    assert_eq!(
        get(SHOP_API_KEY, "/api/v1/projects/shop").json()["keys"],
        hs
    );
    assert_refusal(
        &get(SHOP_API_KEY, "/api/v1/projects/blog"),
        403,
        "forbidden",
    );
    assert_refusal(
        &get(ADMIN_KEY, "/api/v1/projects/nope"),
        404,
        "unknown_project",
    );
    let r = get("wrong", "/api/v1/projects");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "unauthorized");

    // What the API created shows up, with the kind of each key.
    let r = http_request(
        api,
        "POST",
        "/api/v1/projects",
        ADMIN_KEY,
        r#"{"id":"fresh"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let pem = es256_public_pem();
    let body = serde_json::json!({"alg": "ES256", "pem": pem}).to_string();
    let r = http_request(
        api,
        "PUT",
        "/api/v1/projects/fresh/keys/e1",
        ADMIN_KEY,
        &body,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let fresh = get(ADMIN_KEY, "/api/v1/projects/fresh");
    assert_eq!(fresh.status, 200, "{}", fresh.text());
    let fresh = fresh.json();
    assert_eq!(fresh["id"], "fresh");
    assert_eq!(fresh["source"], "api");
    assert_eq!(
        fresh["keys"],
        serde_json::json!([{"kid": "e1", "alg": "ES256", "kind": "ec", "source": "api"}])
    );
    assert!(!fresh.to_string().contains("BEGIN PUBLIC KEY"));

    // Each key says where it was given: a key added through the API to a project of the
    // config file is listed as the API's, after the file's.
    let r = http_request(
        api,
        "PUT",
        "/api/v1/projects/blog/keys/e2",
        ADMIN_KEY,
        &body,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        get(ADMIN_KEY, "/api/v1/projects/blog").json()["keys"],
        serde_json::json!([
            {"kid": "k1", "alg": "HS256", "kind": "hmac", "source": "config"},
            {"kid": "e2", "alg": "ES256", "kind": "ec", "source": "api"},
        ])
    );

    // A revoked kid is listed, in order, until a key of that kid is put again.
    let r = delete_key(api, ADMIN_KEY, "fresh", "e1");
    assert_eq!(r.status, 204, "{}", r.text());
    let r = delete_key(api, ADMIN_KEY, "shop", "k1");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        get(ADMIN_KEY, "/api/v1/projects/fresh").json()["revoked_kids"],
        serde_json::json!(["e1"])
    );
    assert_eq!(
        get(SHOP_API_KEY, "/api/v1/projects/shop").json()["revoked_kids"],
        serde_json::json!(["k1"])
    );
    let r = put_key(api, SHOP_API_KEY, "shop", "k1");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        get(SHOP_API_KEY, "/api/v1/projects/shop").json()["revoked_kids"],
        serde_json::json!([])
    );
}

/// A project holds at most 32 keys: a new kid beyond is 409 and nothing changes; replacing a
/// kid at the cap still works, and so does a new kid once one is deleted.
#[test]
fn a_project_holds_at_most_32_keys() {
    let server = TestServer::start(|_| {});
    let api = server.api;
    // Shop has one config key (k1): 31 more fill it.
    for i in 0..31 {
        let r = put_key(api, SHOP_API_KEY, "shop", &format!("x{i}"));
        assert_eq!(r.status, 204, "key {i}: {}", r.text());
    }
    let r = put_key(api, SHOP_API_KEY, "shop", "one-too-many");
    assert_refusal(&r, 409, "conflict");
    assert_eq!(
        r.json()["message"],
        "project `shop` has 32 keys, the most a project may have; delete one before adding \
         `one-too-many`"
    );
    let keys = |server: &TestServer| {
        server
            .hub
            .registry
            .load()
            .project("shop")
            .map(|p| p.keys.len())
    };
    assert_eq!(keys(&server), Some(32));
    let r = put_key(api, SHOP_API_KEY, "shop", "x3");
    assert_eq!(r.status, 204, "replacing a kid at the cap: {}", r.text());
    let r = delete_key(api, SHOP_API_KEY, "shop", "x3");
    assert_eq!(r.status, 204, "{}", r.text());
    let r = put_key(api, SHOP_API_KEY, "shop", "one-too-many");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(keys(&server), Some(32));
}

/// A token without a `kid` header, signed with `secret` (HS256).
fn kidless_token(secret: &str) -> String {
    let claims = serde_json::json!({"sub": "alice", "exp": now_secs() + 600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("claims encode")
}

/// The handshake's answer to `token` on /ws/shop.
fn handshake_with(server: &TestServer, token: &str) -> HttpResponse {
    let auth = format!("Authorization: Bearer {token}\r\n");
    http(server.listen, upgrade_request("/ws/shop", &auth).as_bytes())
}

/// A token without a `kid` is tried against the project's keys of its alg only while there
/// are at most 4 of them; with more it is refused before any signature check.
#[test]
fn a_kidless_token_is_refused_when_more_than_4_keys_share_its_alg() {
    let server = TestServer::start(|_| {});
    // k1 (the config key) and three more HS256 keys: a kid-less token still finds its key.
    for i in 0..3 {
        let r = put_key(server.api, SHOP_API_KEY, "shop", &format!("h{i}"));
        assert_eq!(r.status, 204, "{}", r.text());
    }
    let good = kidless_token(SHOP_SECRET);
    let (ws, _) = connect(server.listen, "shop", &good);
    close(ws);
    // A fifth: every kid-less HS256 token is refused, whatever its signature.
    let r = put_key(server.api, SHOP_API_KEY, "shop", "h3");
    assert_eq!(r.status, 204, "{}", r.text());
    let forged = kidless_token("not-any-key-of-this-project-0123");
    for token in [&good, &forged] {
        let r = handshake_with(&server, token);
        assert_refusal(&r, 401, "unauthorized");
        assert_eq!(
            r.json()["message"],
            "token has no kid and the project has 5 keys of this alg; a token must name its \
             key (kid) when more than 4 share its alg"
        );
    }
    // A token naming its key still verifies.
    let (ws, _) = connect_user(server.listen, "shop", "alice");
    close(ws);
}

/// A key change through the API reads no file: an admin key, a project's API key or a key
/// secret written to disk for the next reload takes effect on that reload, not when a tenant
/// changes a key; an unreadable file does not refuse the change either.
#[test]
fn a_key_change_keeps_the_secrets_read_from_files_at_start() {
    let dir = TempDir::new("secret-files");
    let admin_file = dir.write("admin.key", "admin-key-read-at-start-0123\n");
    let shop_key_file = dir.write("shop.key", &format!("{SHOP_API_KEY}\n"));
    let shop_secret_file = dir.write("shop.secret", &format!("{SHOP_SECRET}\n"));
    let mut cfg = config();
    cfg.server.state_dir = Some(dir.0.join("state"));
    cfg.api.admin_key = None;
    cfg.api.admin_key_file = Some(admin_file.clone());
    let shop = &mut cfg.projects[0];
    shop.api_key = None;
    shop.api_key_file = Some(shop_key_file.clone());
    shop.keys[0].secret = None;
    shop.keys[0].secret_file = Some(shop_secret_file.clone());
    let toml = toml::to_string(&cfg).expect("config as TOML");
    let options = herald::server::Options {
        config_path: Some(dir.write("herald.toml", &toml)),
        ..Default::default()
    };
    let handle = herald::server::start_with(&cfg, options).expect("server starts");
    let api = handle.api_listen;
    let status = |key: &str, path: &str| http_request(api, "GET", path, key, "").status;
    let (old_admin, new_admin) = (
        "admin-key-read-at-start-0123",
        "admin-key-for-the-next-reload",
    );
    let (new_shop_key, new_shop_secret) = (
        "shop-key-for-the-next-reload",
        "shop-secret-for-the-next-reload",
    );
    let claims = serde_json::json!({"sub": "alice", "exp": now_secs() + 600});
    assert_eq!(status(old_admin, "/api/v1/projects"), 200);
    let files = [
        (&admin_file, new_admin),
        (&shop_key_file, new_shop_key),
        (&shop_secret_file, new_shop_secret),
    ];
    // What an operator writes for the next reload.
    let stage_new_files = || {
        for (file, text) in files {
            std::fs::write(file, text).expect("write staged file");
        }
    };

    // The admin key, shop's API key and shop's k1 secret work; the stale keys do not.
    let in_force = |[admin, shop_key, secret]: [&str; 3],
                    [stale_admin, stale_shop_key]: [&str; 2]| {
        assert_eq!(status(admin, "/api/v1/projects"), 200);
        assert_eq!(status(stale_admin, "/api/v1/projects"), 401);
        assert_eq!(status(shop_key, "/api/v1/projects/shop"), 200);
        assert_eq!(status(stale_shop_key, "/api/v1/projects/shop"), 401);
        let (ws, _) = connect(handle.listen, "shop", &mint_with(secret, &claims));
        close(ws);
    };

    stage_new_files();
    let r = put_key(api, SHOP_API_KEY, "shop", "k9");
    assert_eq!(r.status, 204, "{}", r.text());
    in_force(
        [old_admin, SHOP_API_KEY, SHOP_SECRET],
        [new_admin, new_shop_key],
    );

    for (file, _) in files {
        std::fs::remove_file(file).expect("remove file");
    }
    let r = put_key(api, SHOP_API_KEY, "shop", "k10");
    assert_eq!(r.status, 204, "unreadable files: {}", r.text());
    stage_new_files();

    // The reload (what SIGHUP runs) reads them.
    handle.admin.reload().expect("reload");
    in_force(
        [new_admin, new_shop_key, new_shop_secret],
        [old_admin, SHOP_API_KEY],
    );
    handle.shutdown();
    handle.join();
}

/// Adds `n` RSA-4096 keys to `project`, so each change to it is real work.
fn heavy_project(c: &mut herald::config::Config, project: &str, n: usize) {
    let shop = c
        .projects
        .iter_mut()
        .find(|p| p.id == project)
        .expect("project");
    shop.keys.extend((0..n).map(|i| KeyConfig {
        kid: Some(format!("heavy{i}")),
        alg: "RS256".into(),
        pem: Some(RSA_4096_PUBLIC.into()),
        ..KeyConfig::default()
    }));
}

/// Sends `request` on a new connection and reads until the server closes it; returns the
/// status line and the body's `error` code, or empty strings when nothing was answered.
fn answer_to(api: std::net::SocketAddr, request: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = tcp(api);
    let _ = s.write_all(request.as_bytes());
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    let status = text.lines().next().unwrap_or_default().to_owned();
    let error = text
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(body).ok())
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status, error)
}

fn put_key_request(kid: &str, bearer: &str, keep_alive: bool) -> String {
    let body = r#"{"alg":"HS256","secret":"a-secret-of-enough-length-0123"}"#;
    let connection = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    format!(
        "PUT /api/v1/projects/shop/keys/{kid} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \
         {bearer}\r\nContent-Length: {}\r\n{connection}\r\n{body}",
        body.len()
    )
}

#[test]
fn one_key_queueing_changes_cannot_lock_health_checks_out() {
    let server = TestServer::start(|c| {
        c.api.max_connections = 8;
        // With the 16 kids the flood adds, shop reaches the 32-key cap.
        heavy_project(c, "shop", 15);
    });
    let (api, stop) = (server.api, Arc::new(AtomicBool::new(false)));
    let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let flood: Vec<_> = (0..16)
        .map(|t| {
            let (stop, answers) = (stop.clone(), answers.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let answer =
                        answer_to(api, &put_key_request(&format!("x{t}"), SHOP_API_KEY, false));
                    answers.lock().unwrap().push(answer);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut unanswered = 0;
    for _ in 0..20 {
        let (status, _) = answer_to(
            api,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if status != "HTTP/1.1 200 OK" {
            unanswered += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for t in flood {
        t.join().expect("flood thread");
    }
    assert_eq!(unanswered, 0, "health checks got no answer");
    // Beyond its few queued changes, the key is told to come back later.
    let answers = answers.lock().unwrap();
    assert!(
        answers.iter().any(|a| a
            == &(
                "HTTP/1.1 429 Too Many Requests".to_owned(),
                "busy".to_owned()
            )),
        "{answers:?}"
    );
    for (status, error) in answers.iter().filter(|(s, _)| !s.is_empty()) {
        assert!(
            status == "HTTP/1.1 204 No Content"
                || (status == "HTTP/1.1 429 Too Many Requests" && error == "busy"),
            "{status} {error}"
        );
    }
}

#[test]
fn a_change_handled_longer_than_the_idle_timeout_is_answered() {
    const IDLE_MS: u64 = 15;
    let server = TestServer::start(|c| {
        c.api.idle_timeout_ms = IDLE_MS;
        // With the kids put below, each project stays under the 32-key cap.
        heavy_project(c, "shop", 25);
        heavy_project(c, "blog", 25);
    });
    let (api, started) = (server.api, Instant::now());
    // Keep-alive requests (4 per key, the most one key may queue), handled one at a time:
    // the later ones wait for their turn longer than the idle timeout.
    let puts: Vec<_> = (0..12)
        .map(|t| {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut s = tcp(api);
                let (bearer, project) = match t {
                    0..4 => (SHOP_API_KEY, "shop"),
                    4..8 => (BLOG_API_KEY, "blog"),
                    _ => (ADMIN_KEY, if t % 2 == 0 { "shop" } else { "blog" }),
                };
                let request = put_key_request(&format!("x{t}"), bearer, true)
                    .replace("/projects/shop/", &format!("/projects/{project}/"));
                s.write_all(request.as_bytes()).expect("write");
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
        })
        .collect();
    let answers: Vec<String> = puts.into_iter().map(|t| t.join().expect("put")).collect();
    let took = started.elapsed();
    eprintln!("12 changes in {took:?}");
    assert_eq!(answers, vec!["HTTP/1.1 204 No Content"; 12]);
    // The scenario did what it is about: the last change answered was handled (queued, then
    // built) for longer than the idle timeout.
    assert!(
        took > Duration::from_millis(IDLE_MS + 5),
        "12 changes took {took:?}: not longer than the idle timeout"
    );
}

/// An HS256 token of `shop` for `sub`, signed with `secret` under key id `kid`.
fn token_with_kid(kid: &str, secret: &str, sub: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(
        &header,
        &serde_json::json!({"sub": sub, "exp": now_secs() + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token")
}

/// `DELETE` of a key of shop, as shop.
fn revoke(api: std::net::SocketAddr, path: &str) -> HttpResponse {
    http_request(api, "DELETE", path, SHOP_API_KEY, "")
}

#[test]
fn a_retried_revoke_closes_the_keys_connections() {
    let server = TestServer::start(|_| {});
    let api = server.api;
    let r = put_key(api, SHOP_API_KEY, "shop", "k2");
    assert_eq!(r.status, 204, "{}", r.text());
    let token = token_with_kid("k2", "a-secret-of-enough-length-0123", "ann");
    let (mut ws, _) = connect(server.listen, "shop", &token);
    // Revoked (as when the disconnect orders did not all go out): the connection stays.
    let r = revoke(api, "/api/v1/projects/shop/keys/k2");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(request(&mut ws, r#"{"op":"ping","id":1}"#)["type"], "pong");
    // The retry with disconnect=true sends the orders again.
    let r = revoke(api, "/api/v1/projects/shop/keys/k2?disconnect=true");
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    assert_eq!(expect_close(&mut ws).0, 4003);
    // Without disconnect there is nothing left to do; a key never registered is unknown.
    let r = revoke(api, "/api/v1/projects/shop/keys/k2");
    assert_refusal(&r, 404, "not_found");
    let r = revoke(api, "/api/v1/projects/shop/keys/never?disconnect=true");
    assert_refusal(&r, 404, "not_found");
}
