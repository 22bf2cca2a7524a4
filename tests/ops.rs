//! The real binary as an operator runs it: what a bad config file prints (never a secret),
//! a second node on a client address already in use, what SIGHUP says and tells systemd,
//! a second stop signal during a drain, and the CLI's messages.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{HeraldProcess, RawClient, TIMEOUT, TempDir, run_herald, write_config};

/// A secret that must never be printed.
const SECRET: &str = "ops-test-secret-never-printed-0123456789";

/// A config with project `shop` (HS256 key [`SECRET`]), with `server_extra` and `ws_extra`
/// lines added to `[server]` and `[ws]`.
fn config_text(dir: &TempDir, server_extra: &str, ws_extra: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
api_listen = "127.0.0.1:0"
shards = 2
pin_cores = false
state_dir = "{state}"
{server_extra}

[ws]
{ws_extra}

[api]
admin_key = "ops-test-admin-key-0123456789abcdef"

[log]
level = "info"

[[projects]]
id = "shop"
api_key = "ops-test-api-key-0123456789abcdef"

[[projects.keys]]
kid = "k1"
alg = "HS256"
secret = "{SECRET}"
"#,
        state = dir.0.join("state").display(),
    )
}

/// The config with a syntax error on the secret's own line (line 25).
fn broken_secret_line(good: &str) -> String {
    let bad = good.replace(
        &format!("secret = \"{SECRET}\""),
        &format!("secret = \"{SECRET}\" oops"),
    );
    let line = bad.lines().position(|l| l.contains("oops")).unwrap() + 1;
    assert_eq!(line, 25, "the test config moved: {bad}");
    bad
}

#[test]
fn a_config_error_names_line_column_and_key_but_never_the_secret() {
    let dir = TempDir::new("secret");
    let good = config_text(&dir, "", "");
    let bad = dir.write("bad.toml", &broken_secret_line(&good));
    let path = bad.to_str().unwrap();

    // check-config and serve: stderr at start.
    let (status, out, err) = run_herald(&["check-config", "--config", path]);
    assert!(!status.success(), "{out}");
    assert!(
        !err.contains(SECRET),
        "check-config printed the secret: {err}"
    );
    assert_eq!(
        err,
        format!(
            "herald: {path}: line 25, column {}, key `secret`: unexpected key or value, \
             expected newline, `#`\n",
            "secret = \"\" ".len() + SECRET.len() + 1
        ),
    );
    let (status, _, err) = run_herald(&["serve", "--config", path]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(!err.contains(SECRET), "serve printed the secret: {err}");
    assert!(err.contains("line 25, column "), "{err}");

    // A value of the wrong type quotes the value in serde's message: left out too.
    let typed = dir.write(
        "typed.toml",
        &good.replace(
            "level = \"info\"",
            &format!("level = \"info\"\nformat = \"{SECRET}\""),
        ),
    );
    let (_, _, err) = run_herald(&["check-config", "--config", typed.to_str().unwrap()]);
    assert!(!err.contains(SECRET), "{err}");
    assert!(err.contains("line 17, column 10"), "{err}");
    assert!(err.contains("unknown variant, expected"), "{err}");

    // SIGHUP with the broken file: the log names the place, not the line.
    let (node, _) = HeraldProcess::start(&dir, &good, &[]);
    write_config(&dir, &broken_secret_line(&good));
    let at = node.log_len();
    node.signal(libc::SIGHUP);
    let line = node.wait_log("reload refused", at);
    assert!(line.contains("line 25, column "), "{line}");
    assert!(line.contains("key `secret`"), "{line}");
    assert!(
        !node.stderr().contains(SECRET),
        "the log has the secret: {}",
        node.stderr()
    );
}

#[test]
fn a_second_node_on_the_same_client_address_is_refused_unless_handing_over() {
    let dir = TempDir::new("second");
    let (_first, ready) = HeraldProcess::start(&dir, &config_text(&dir, "", ""), &[]);
    let (config, listen) = (dir.0.join("herald.toml"), ready.listen);

    let addr = listen.to_string();
    let state2 = dir.0.join("state2");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--listen",
        &addr,
        "--api-listen",
        "127.0.0.1:0",
        "--state-dir",
        state2.to_str().unwrap(),
    ];
    let mut second = HeraldProcess::spawn(&args, &[]);
    let status = second.wait(TIMEOUT * 3);
    assert_eq!(status.code(), Some(1), "{}", second.stderr());
    let err = second.stderr();
    assert!(
        err.contains(&format!(
            "cannot listen on {addr}: another process already listens there"
        )),
        "{err}"
    );
    assert!(second.stdout.try_recv().is_err(), "no ready line");

    // The explicit hand-over shares the port.
    let mut with = args.to_vec();
    with.push("--handover");
    let third = HeraldProcess::spawn(&with, &[]);
    assert_eq!(third.ready().listen, listen);
}

/// Receives notify datagrams until one has the line `line`; returns every datagram seen.
fn recv_until(sock: &UnixDatagram, line: &str) -> Vec<String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == line);
            seen.push(msg);
            if hit {
                return seen;
            }
        }
    }
    panic!("no `{line}` within {TIMEOUT:?}; got {seen:?}");
}

#[test]
fn sighup_names_every_setting_that_needs_a_restart_and_reports_a_refusal() {
    let dir = TempDir::new("sighup");
    let sock_path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let good = config_text(&dir, "", "");
    let (node, _) = HeraldProcess::start(&dir, &good, &[("NOTIFY_SOCKET", sock_path.as_os_str())]);
    let config = dir.0.join("herald.toml");
    recv_until(&sock, "READY=1");

    // Restart-only settings changed, plus a key a reload applies (the project's leeway).
    let changed = config_text(&dir, "drain_timeout_ms = 1234", "max_message_bytes = 4096")
        .replace(
            "[log]\nlevel = \"info\"",
            "[log]\nlevel = \"info\"\nformat = \"json\"",
        )
        .replace("id = \"shop\"", "id = \"shop\"\nleeway_secs = 5");
    std::fs::write(&config, &changed).unwrap();
    let at = node.log_len();
    node.signal(libc::SIGHUP);
    recv_until(&sock, "RELOADING=1");
    let done = recv_until(&sock, "READY=1");
    let done = done.last().unwrap();
    assert!(done.contains("STATUS=serving (reloaded)"), "{done}");
    assert!(done.lines().any(|l| l == "ERRNO=0"), "{done}");
    node.wait_log("projects and keys reloaded", at);
    let log = node.log_since(at);
    let named: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("needs a restart to take effect"))
        .collect();
    for key in [
        "server.drain_timeout_ms",
        "ws.max_message_bytes",
        "log.format",
    ] {
        assert_eq!(
            named
                .iter()
                .filter(|l| l.contains(&format!("SIGHUP: {key} changed")))
                .count(),
            1,
            "{key} is named once: {log}"
        );
    }
    assert_eq!(named.len(), 3, "only the changed keys: {log}");

    // The same file again: the running values did not change, so the same keys are named.
    let at = node.log_len();
    node.signal(libc::SIGHUP);
    node.wait_log("projects and keys reloaded", at);
    let again = node.log_since(at);
    assert_eq!(
        again.matches("needs a restart to take effect").count(),
        3,
        "{again}"
    );
    recv_until(&sock, "READY=1");

    // A refused reload is not reported to systemd as a successful one.
    std::fs::write(&config, changed.replace("shards = 2", "shards = two")).unwrap();
    let at = node.log_len();
    node.signal(libc::SIGHUP);
    recv_until(&sock, "RELOADING=1");
    let refused = recv_until(&sock, "READY=1");
    let refused = refused.last().unwrap();
    assert!(
        refused.contains("STATUS=reload refused, old settings stay: "),
        "{refused}"
    );
    assert!(refused.contains("key `shards`"), "{refused}");
    assert!(!refused.contains("reloaded"), "{refused}");
    assert!(refused.lines().any(|l| l == "ERRNO=22"), "{refused}");
    node.wait_log("reload refused", at);
}

#[test]
fn a_second_stop_signal_during_a_drain_exits_at_once() {
    let dir = TempDir::new("second-term");
    // A drain that would wait a minute for a client that never answers the close.
    let config = config_text(&dir, "drain_timeout_ms = 60000", "");
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let (mut node, ready) = HeraldProcess::start(&dir, &config, &[]);
        let listen = ready.listen;
        let jwt = common::mint_with(
            SECRET,
            &serde_json::json!({"sub": "deaf", "exp": common::now_secs() + 600}),
        );
        let (mut deaf, _) = RawClient::upgrade(listen, "shop", &jwt);
        node.signal(libc::SIGTERM);
        assert_eq!(deaf.expect_close().0, 1001, "the drain started");
        node.signal(sig);
        // Well under the drain's minute.
        let status = node.wait(Duration::from_secs(15));
        assert_eq!(status.code(), Some(128 + sig), "{}", node.stderr());
        assert!(
            node.stderr()
                .contains("second stop signal during the drain"),
            "{}",
            node.stderr()
        );
    }
}

#[test]
fn check_config_names_the_file_once() {
    let dir = TempDir::new("once");
    let good = config_text(&dir, "", "");
    // A parse error (unknown key), then a rule broken after parsing.
    for (file, from, to, named) in [
        ("typo.toml", "pin_cores", "pin_core", "pin_core"),
        ("alg.toml", "alg = \"HS256\"", "alg = \"HS999\"", "alg"),
    ] {
        let path = dir.write(file, &good.replace(from, to));
        let path = path.to_str().unwrap();
        let (status, _, err) = run_herald(&["check-config", "--config", path]);
        assert!(!status.success());
        assert_eq!(err.matches(path).count(), 1, "{err}");
        assert!(err.contains(named), "{err}");
    }
    let path = dir.write("good.toml", &good);
    let path = path.to_str().unwrap();
    let (status, out, _) = run_herald(&["check-config", "--config", path]);
    assert!(status.success());
    assert_eq!(out, format!("{path}: ok\n"));
}

#[test]
fn the_development_warning_names_the_projects_of_the_config() {
    let dir = TempDir::new("devwarn");
    let text = config_text(&dir, "", "")
        .replace("id = \"shop\"", "id = \"acme\"")
        .replace(SECRET, herald::config::DEV_SECRET);
    let (node, _) = HeraldProcess::start(&dir, &text, &[]);
    let line = node.wait_log("DEVELOPMENT MODE", 0);
    assert!(line.contains("project `acme`"), "{line}");
    assert!(!line.contains("demo"), "{line}");
    assert!(!line.contains("herald-dev-admin"), "{line}");

    // The embedded default: its own project and admin key.
    let state = dir.0.join("state-dev");
    let node = HeraldProcess::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        &[],
    );
    node.ready();
    let line = node.wait_log("DEVELOPMENT MODE", 0);
    assert!(
        line.contains("project `demo`, admin key `herald-dev-admin`"),
        "{line}"
    );
}

#[test]
fn the_readme_production_commands_run_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let block = readme
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains("genconfig"))
        .expect("a shell block with genconfig");
    let lines: Vec<&str> = block.lines().collect();
    assert_eq!(lines[0], "cargo build --release", "{block}");
    // Every herald command names the binary that line builds, not a `herald` on PATH.
    let commands = &lines[1..];
    assert!(commands.len() >= 3, "{block}");
    for line in commands {
        assert!(line.starts_with("./target/release/herald "), "{line}");
    }
    // Run them (but `serve`) with this build's binary, in a scratch directory.
    let dir = TempDir::new("readme");
    for line in commands.iter().filter(|l| !l.contains(" serve ")) {
        let line = line.replace("./target/release/herald", env!("CARGO_BIN_EXE_herald"));
        let out = Command::new("sh")
            .args(["-c", &line])
            .current_dir(&dir.0)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        commands
            .iter()
            .any(|l| l.contains(" serve --config herald.toml"))
    );
}
