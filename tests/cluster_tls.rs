//! A node reaching Redis over TLS (`rediss://`): a `redis-server` of the test's own listening
//! on a TLS port only, with a certificate from a throwaway CA the test makes with the
//! `openssl` command.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A throwaway CA and a certificate it signs for `127.0.0.1`, in `dir`: (CA, cert, key).
fn make_ca_and_server_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let path = |f: &str| dir.join(format!("{name}-{f}"));
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is installed (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |p: &PathBuf| p.to_str().expect("UTF-8 path").to_owned();
    let (ca, ca_key) = (path("ca.pem"), path("ca.key"));
    let (cert, key, csr, ext) = (
        path("server.pem"),
        path("server.key"),
        path("server.csr"),
        path("ext.cnf"),
    );
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", &s(&ca_key), "-out", &s(&ca), "-days", "2"],
            &["-subj", &format!("/CN={name} test CA")],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                &s(&key),
                "-out",
                &s(&csr),
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\n").expect("write ext.cnf");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-out",
        &s(&cert),
        "-days",
        "2",
        "-extfile",
        &s(&ext),
    ]);
    (ca, cert, key)
}

/// A `redis-server` listening with TLS only (no plain port), killed on drop.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
}

impl TlsRedis {
    /// Listens with `cert` and `key`; asks clients for a certificate signed by `ca` when
    /// `client_certs`.
    fn start(dir: &Path, ca: &Path, cert: &Path, key: &Path, client_certs: bool) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--tls-auth-clients"])
            .arg(if client_certs { "yes" } else { "no" })
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .arg("--tls-ca-cert-file")
            .arg(ca)
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        wait_until("redis-server listens on its TLS port", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self { child, port }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node's TOML with `[engine]` on `rediss://127.0.0.1:<port>` trusting `ca`, changed by
/// `tweak`.
fn tls_toml(
    dir: &TempDir,
    port: u16,
    ca: &Path,
    tweak: impl FnOnce(&mut herald::config::EngineConfig),
) -> String {
    let mut c = config();
    c.server.state_dir = Some(dir.0.join("state"));
    let mut engine = herald::config::EngineConfig {
        url: format!("rediss://127.0.0.1:{port}/0"),
        prefix: "tls:".into(),
        tls_ca_file: Some(ca.to_owned()),
        ..Default::default()
    };
    tweak(&mut engine);
    c.engine = Some(engine);
    toml::to_string(&c).expect("a config serialises")
}

/// `herald check-config --connect` on `toml`.
fn check_connect(dir: &TempDir, toml: &str) -> (std::process::ExitStatus, String, String) {
    let path = write_config(dir, toml);
    run_herald(&[
        "check-config",
        "--config",
        path.to_str().expect("UTF-8 path"),
        "--connect",
    ])
}

#[test]
fn a_node_on_rediss_delivers_and_a_wrong_ca_is_refused() {
    let certs = TempDir::new("tls-certs");
    let (ca, cert, key) = make_ca_and_server_cert(&certs.0, "redis");
    let (other_ca, _, _) = make_ca_and_server_cert(&certs.0, "other");
    let redis = TlsRedis::start(&certs.0, &ca, &cert, &key, false);

    // The right CA: check-config reaches Redis over TLS, and a node delivers through it.
    let dir = TempDir::new("tls-node");
    let toml = tls_toml(&dir, redis.port, &ca, |_| ());
    let (status, out, err) = check_connect(&dir, &toml);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("engine: Redis 7."), "{out}");
    let (_node, ready) = HeraldProcess::start(&dir, &toml, &[]);
    wait_engine_up(ready.api, true);
    let (mut ws, _) = connect_user(ready.listen, "shop", "reader");
    subscribe(&mut ws, "news");
    let r = publish(
        ready.api,
        SHOP_API_KEY,
        r#"{"project":"shop","topic":"news","data":{"over":"tls"}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().expect("an id").to_owned();
    let (topic, data, got, _) = split_message(&recv_text(&mut ws));
    assert_eq!(
        (topic, data, got),
        ("news".into(), r#"{"over":"tls"}"#.into(), id)
    );
    let r = http_request(ready.api, "GET", "/readyz", "", "");
    assert_eq!((r.status, r.text()), (200, r#"{"status":"ready"}"#.into()));

    // A CA that did not sign Redis's certificate: refused, said why, never ready.
    let wrong = TempDir::new("tls-wrong-ca");
    let toml = tls_toml(&wrong, redis.port, &other_ca, |_| ());
    let (status, _, err) = check_connect(&wrong, &toml);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("engine: cannot connect"), "{err}");
    assert!(err.contains("UnknownIssuer"), "the TLS reason: {err}");
    // Verification off, when asked for explicitly: the same server is taken unverified.
    let insecure = tls_toml(&wrong, redis.port, &other_ca, |e| {
        e.tls_ca_file = None;
        e.tls_insecure = true;
    });
    let (status, out, err) = check_connect(&wrong, &insecure);
    assert!(status.success(), "{out}{err}");
    let (node, ready) = HeraldProcess::start(&wrong, &toml, &[]);
    let line = node.wait_log("engine unavailable", 0);
    assert!(line.contains("UnknownIssuer"), "the TLS reason: {line}");
    let r = http_request(ready.api, "GET", "/readyz", "", "");
    assert_eq!(
        (r.status, r.text()),
        (503, r#"{"status":"degraded"}"#.into())
    );
    wait_engine_up(ready.api, false);
    let r = publish(
        ready.api,
        SHOP_API_KEY,
        r#"{"project":"shop","topic":"news","data":1}"#,
    );
    assert_refusal(&r, 503, "engine_unavailable");
}

#[test]
fn a_redis_that_asks_for_client_certificates_takes_the_nodes() {
    let certs = TempDir::new("mtls-certs");
    let (ca, cert, key) = make_ca_and_server_cert(&certs.0, "redis");
    let redis = TlsRedis::start(&certs.0, &ca, &cert, &key, true);
    let dir = TempDir::new("mtls-node");

    // Without a client certificate the handshake is refused.
    let toml = tls_toml(&dir, redis.port, &ca, |_| ());
    let (status, out, err) = check_connect(&dir, &toml);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(err.contains("engine: cannot connect"), "{err}");

    // With one the CA signed (the server's own, for the test), it connects.
    let toml = tls_toml(&dir, redis.port, &ca, |e| {
        e.tls_cert_file = Some(cert.clone());
        e.tls_key_file = Some(key.clone());
    });
    let (status, out, err) = check_connect(&dir, &toml);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("engine: Redis 7."), "{out}");
}
