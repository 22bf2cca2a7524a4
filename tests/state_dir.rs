//! The state directory as the binary reads it: `herald token` signs tokens the server
//! accepts for config projects with `issuer`/`audience` and for projects made through the API
//! (read from the state directory, beside the running server that holds its lock); and a
//! `state.json` the server cannot understand stops the start, naming the file, without
//! touching it.

mod common;

use std::path::Path;
use std::process::ExitStatus;

use common::*;
use serde_json::json;

const ISSUER: &str = "https://auth.example.com";
const AUDIENCE: &str = "herald-tests";
/// HS256 secret of the project made through the API.
const MADE_SECRET: &str = "made-through-the-api-0123456789";

/// `shop` requiring `iss` and `aud`, as TOML.
fn config_toml(state_dir: &Path) -> String {
    format!(
        r#"[server]
state_dir = "{state}"

[api]
admin_key = "{ADMIN_KEY}"

[[projects]]
id = "shop"
api_key = "{SHOP_API_KEY}"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"

[[projects.keys]]
kid = "k1"
alg = "HS256"
secret = "{SHOP_SECRET}"
"#,
        state = state_dir.display()
    )
}

/// `herald token` run to completion ([`run_herald`]): (status, stdout, stderr).
fn token_cmd(
    config: &Path,
    extra: &[&str],
    project: &str,
    sub: &str,
) -> (ExitStatus, String, String) {
    let mut args = vec!["token", "--config", config.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--project", project, "--sub", sub]);
    run_herald(&args)
}

fn minted((status, stdout, stderr): &(ExitStatus, String, String)) -> String {
    assert!(status.success(), "herald token failed: {stderr}");
    stdout.trim().to_owned()
}

#[test]
fn token_command_signs_for_issuer_audience_and_api_made_projects() {
    let dir = TempDir::new("token-state");
    let state = dir.0.join("state");
    let config = write_config(&dir, &config_toml(&state));
    let server = TestServer::start(|c| {
        c.server.state_dir = Some(state.clone());
        c.projects.truncate(1);
        c.projects[0].issuer = Some(ISSUER.into());
        c.projects[0].audience = Some(AUDIENCE.into());
    });
    let made = json!({
        "id": "made",
        "keys": [{"kid": "m1", "alg": "HS256", "secret": MADE_SECRET}],
    })
    .to_string();
    let r = http_request(server.api, "POST", "/api/v1/projects", ADMIN_KEY, &made);
    assert_eq!(r.status, 201, "{}", r.text());

    // The state directory named by the config (the server holds its lock meanwhile).
    let t = minted(&token_cmd(&config, &[], "shop", "alice@example.com"));
    let (ws, w) = connect(server.listen, "shop", &t);
    assert!(
        w.text.contains(r#""user":"alice@example.com""#),
        "{}",
        w.text
    );
    close(ws);
    let t = minted(&token_cmd(&config, &[], "made", "auth0|5f1c"));
    let (ws, w) = connect(server.listen, "made", &t);
    assert!(w.text.contains(r#""project":"made""#), "{}", w.text);
    close(ws);

    // --state-dir names it explicitly (over a config that names another one).
    let elsewhere = dir.write("elsewhere.toml", &config_toml(&dir.0.join("empty")));
    let (status, _, err) = token_cmd(&elsewhere, &[], "made", "bob");
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("no project `made`"), "{err}");
    let state_arg = ["--state-dir", state.to_str().expect("utf-8 path")];
    let t = minted(&token_cmd(&elsewhere, &state_arg, "made", "bob"));
    let (ws, _) = connect(server.listen, "made", &t);
    close(ws);

    // A sub, a device or a lifetime the server would refuse is refused here too.
    let (status, _, err) = token_cmd(&config, &[], "shop", "");
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("--sub"));
    let (status, _, err) = token_cmd(&config, &["--device", ""], "shop", "alice");
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("--device"));
    let too_long = (30 * 86_400 + 1).to_string();
    let (status, _, err) = token_cmd(&config, &["--ttl", &too_long], "shop", "alice");
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("max_token_lifetime_secs (2592000)"), "{err}");
    let longest = (30 * 86_400).to_string();
    let t = minted(&token_cmd(&config, &["--ttl", &longest], "shop", "alice"));
    let (ws, _) = connect(server.listen, "shop", &t);
    close(ws);
    drop(server);
}

#[test]
fn a_state_file_that_is_not_an_object_or_from_the_future_stops_the_start() {
    for (name, doc, says) in [
        ("array", "[]", "must be a JSON object, not an array"),
        (
            "future",
            r#"{"version":99,"projects":{}}"#,
            "version 99 was written by a newer herald",
        ),
        (
            "version-string",
            r#"{"version":"sk-live-do-not-echo","projects":{}}"#,
            "`version` must be an integer, not a string",
        ),
    ] {
        let dir = TempDir::new(&format!("bad-state-{name}"));
        let state = dir.0.join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        let file = state.join("state.json");
        std::fs::write(&file, doc).expect("state.json");
        let mut server = HeraldProcess::spawn_on(&dir, &config_toml(&state), &[]);
        let status = server.wait(TIMEOUT);
        let err = server.stderr();
        assert_eq!(status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(&file.display().to_string()) && err.contains(says),
            "{name}: {err}"
        );
        assert!(
            !err.contains("sk-live"),
            "{name}: the value is not echoed: {err}"
        );
        assert!(server.stdout.try_recv().is_err(), "{name}: never ready");
        assert_eq!(std::fs::read_to_string(&file).expect("kept"), doc, "{name}");
    }
}
