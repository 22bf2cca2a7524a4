//! The control plane over real HTTP: connection listing (filters, pagination under churn)
//! across shards, kicking one connection, disconnecting a user, stats, metrics and readyz
//! during a drain.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use common::*;
use serde_json::Value;

fn get(api: SocketAddr, key: &str, path: &str) -> HttpResponse {
    http_request(api, "GET", path, key, "")
}

/// Every page of a listing, following `next_cursor`; returns the ids in order.
fn list_all(api: SocketAddr, key: &str, query: &str, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor = String::new();
    for _ in 0..10_000 {
        let r = get(
            api,
            key,
            &format!("/api/v1/connections?{query}&limit={limit}&cursor={cursor}"),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let page = v["connections"].as_array().expect("connections array");
        assert!(page.len() <= limit);
        ids.extend(
            page.iter()
                .map(|c| c["id"].as_str().expect("id").to_owned()),
        );
        match &v["next_cursor"] {
            Value::Null => return ids,
            Value::String(c) => cursor = c.clone(),
            other => panic!("next_cursor is {other}"),
        }
    }
    panic!("listing did not end");
}

fn id_key(id: &str) -> (u32, u32, u32) {
    let p: Vec<u32> = id
        .split('-')
        .map(|x| u32::from_str_radix(x, 16).expect("hex"))
        .collect();
    (p[0], p[1], p[2])
}

#[test]
fn listing_across_shards_with_filters() {
    let server = TestServer::start(|_| {});
    let mut alice = connect_spread(server.listen, "shop", "alice", 4);
    let (mut bob, bob_w) = connect_user(server.listen, "shop", "bob");
    subscribe(&mut bob, "news");
    let (_carol, carol_w) = connect_user(server.listen, "blog", "carol");
    server.wait_connections(alice.len() + 2);

    // Admin: everything, in id order, with the contract's fields.
    let r = get(server.api, ADMIN_KEY, "/api/v1/connections");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["next_cursor"], Value::Null);
    let conns = v["connections"].as_array().unwrap();
    assert_eq!(conns.len(), alice.len() + 2);
    let ids: Vec<String> = conns
        .iter()
        .map(|c| c["id"].as_str().unwrap().into())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_by_key(|i| id_key(i));
    assert_eq!(ids, sorted, "listed in id order");
    let shards: BTreeSet<u32> = ids.iter().map(|i| id_key(i).0).collect();
    assert_eq!(shards.len(), 2, "both shards answer");
    let bob_json = conns
        .iter()
        .find(|c| c["id"] == bob_w.conn.as_str())
        .unwrap();
    let keys: BTreeSet<&str> = bob_json
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["id", "project", "user", "ip", "connected_at", "topics"])
    );
    assert_eq!(bob_json["project"], "shop");
    assert_eq!(bob_json["user"], "bob");
    assert_eq!(bob_json["ip"], "127.0.0.1");
    let at = bob_json["connected_at"].as_u64().unwrap();
    assert!(at <= now_ms() && at + 60_000 > now_ms());
    assert_eq!(
        bob_json["topics"],
        serde_json::json!(["all", "user.bob", "news"])
    );

    // A project key sees its own project only (and defaults to it).
    let r = get(server.api, BLOG_API_KEY, "/api/v1/connections");
    let v = r.json();
    let conns = v["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0]["id"], carol_w.conn.as_str());
    let r = get(server.api, BLOG_API_KEY, "/api/v1/connections?project=shop");
    assert_refusal(&r, 403, "forbidden");

    // Filters.
    let by = |q: &str| -> BTreeSet<String> {
        let r = get(server.api, ADMIN_KEY, &format!("/api/v1/connections?{q}"));
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        r.json()["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let alice_ids: BTreeSet<String> = alice.iter().map(|(_, w)| w.conn.clone()).collect();
    assert_eq!(by("user=alice"), alice_ids);
    assert_eq!(by("project=shop&user=alice"), alice_ids);
    assert!(by("project=blog&user=alice").is_empty());
    assert_eq!(by("topic=news"), BTreeSet::from([bob_w.conn.clone()]));
    assert_eq!(by("project=blog"), BTreeSet::from([carol_w.conn.clone()]));
    assert_eq!(by("topic=all&project=shop").len(), alice.len() + 1);

    // Pagination covers the same set, each once.
    let paged = list_all(server.api, ADMIN_KEY, "project=shop", 2);
    assert_eq!(paged.len(), alice.len() + 1);
    assert_eq!(paged.iter().collect::<BTreeSet<_>>().len(), paged.len());

    // Bad queries.
    for q in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "cursor=zz",
        "topic=a%20b",
        "bogus=1",
    ] {
        let r = get(server.api, ADMIN_KEY, &format!("/api/v1/connections?{q}"));
        assert_refusal(&r, 400, "bad_request");
    }
    let r = get(server.api, ADMIN_KEY, "/api/v1/connections?project=nope");
    assert_refusal(&r, 404, "unknown_project");
    let r = get(server.api, "wrong", "/api/v1/connections");
    assert_eq!(r.status, 401);
    for (ws, _) in alice.iter_mut() {
        let _ = ws.close(None);
    }
}

#[test]
fn pagination_under_churn_misses_and_repeats_nothing() {
    let server = TestServer::start(|_| {});
    // Stable connections, open for the whole listing.
    let stable = connect_spread(server.listen, "shop", "stable", 24);
    let stable_ids: BTreeSet<String> = stable.iter().map(|(_, w)| w.conn.clone()).collect();
    // Churning connections: some close during the listing, new ones open.
    let mut churn: Vec<(Client, Welcome)> = (0..16)
        .map(|_| connect_user(server.listen, "shop", "churn"))
        .collect();
    server.wait_connections(stable.len() + churn.len());

    let mut seen = Vec::new();
    let mut cursor = String::new();
    let mut page_nr = 0;
    loop {
        let r = get(
            server.api,
            SHOP_API_KEY,
            &format!("/api/v1/connections?limit=3&cursor={cursor}"),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        for c in v["connections"].as_array().unwrap() {
            seen.push(c["id"].as_str().unwrap().to_owned());
        }
        // Churn between pages: close two, open two (new ones may reuse freed slots).
        page_nr += 1;
        if page_nr % 2 == 0 {
            for _ in 0..2 {
                if let Some((mut ws, _)) = churn.pop() {
                    let _ = ws.close(None);
                    let _ = read_until_close(&mut ws);
                }
            }
            for _ in 0..2 {
                churn.insert(0, connect_user(server.listen, "shop", "churn"));
            }
        }
        match &v["next_cursor"] {
            Value::Null => break,
            Value::String(c) => cursor = c.clone(),
            other => panic!("next_cursor is {other}"),
        }
        assert!(page_nr < 1000, "listing does not end");
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "no connection listed twice: {seen:?}"
    );
    let mut sorted = seen.clone();
    sorted.sort_by_key(|i| id_key(i));
    assert_eq!(seen, sorted, "pages follow id order");
    for id in &stable_ids {
        assert!(seen.contains(id), "stable connection {id} was missed");
    }
    drop(churn);
}

#[test]
fn kick_one_connection_and_stale_ids() {
    let server = TestServer::start(|_| {});
    let mut conns = connect_spread(server.listen, "shop", "dave", 2);
    let (mut other, other_w) = connect_user(server.listen, "blog", "erin");
    server.wait_connections(conns.len() + 1);
    // Kick one on each shard.
    let mut kicked = Vec::new();
    for shard in [0u16, 1] {
        let i = conns.iter().position(|(_, w)| w.shard == shard).unwrap();
        let (mut ws, w) = conns.remove(i);
        let path = format!("/api/v1/connections/{}", w.conn);
        // Another project's key: 403 and nothing happens.
        let r = http_request(server.api, "DELETE", &path, BLOG_API_KEY, "");
        assert_refusal(&r, 403, "forbidden");
        let r = http_request(server.api, "DELETE", &path, SHOP_API_KEY, "");
        assert_eq!(r.status, 204, "{}", r.text());
        assert!(r.body.is_empty());
        let (code, _) = expect_close(&mut ws);
        assert_eq!(code, 4003);
        kicked.push(w.conn);
    }
    // The rest stay open.
    server.wait_connections(conns.len() + 1);
    // A stale id (closed), a never-issued one and garbage: 404.
    for id in [kicked[0].as_str(), "0-ffff-1", "7-0-1", "nonsense"] {
        let r = http_request(
            server.api,
            "DELETE",
            &format!("/api/v1/connections/{id}"),
            ADMIN_KEY,
            "",
        );
        assert_refusal(&r, 404, "not_found");
    }
    // The admin key kicks any project's connection.
    let r = http_request(
        server.api,
        "DELETE",
        &format!("/api/v1/connections/{}", other_w.conn),
        ADMIN_KEY,
        "",
    );
    assert_eq!(r.status, 204);
    assert_eq!(expect_close(&mut other).0, 4003);
    // Still open and answering.
    for (ws, _) in conns.iter_mut() {
        let pong = request(ws, r#"{"op":"ping","id":1}"#);
        assert_eq!(pong["type"], "pong");
    }
}

#[test]
fn disconnect_waits_for_a_full_inbox_until_its_deadline_then_names_the_shard() {
    let server = TestServer::start(|_| {});
    let mut frank = connect_spread(server.listen, "shop", "frank", 3);
    server.wait_connections(frank.len());
    let inbox = &server.hub.mailboxes[1];
    let fill = || loop {
        // The whole inbox at once: this succeeds only once the shard has taken every
        // message, so nothing it takes afterwards can free room.
        if let Ok(r) = inbox.try_reserve(inbox.capacity(), 0) {
            break r;
        }
    };
    // Room comes back while the API retries: every shard gets the order.
    let r = std::thread::scope(|t| {
        let held = fill();
        t.spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let body = r#"{"project":"shop","user":"frank"}"#;
        http_request(server.api, "POST", "/api/v1/disconnect", ADMIN_KEY, body)
    });
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({ "disconnected": frank.len() }));
    for (ws, _) in frank.iter_mut() {
        assert_eq!(expect_close(ws).0, 4003);
    }
    // Full past the deadline: 503 `busy` naming the shard.
    let held = fill();
    let body = r#"{"project":"shop","user":"grace"}"#;
    let r = http_request(server.api, "POST", "/api/v1/disconnect", ADMIN_KEY, body);
    assert_refusal(&r, 503, "busy");
    assert_eq!(
        r.json()["message"],
        "shard [1] inbox stayed full for 5s",
        "{}",
        r.text()
    );
    drop(held);
    let r = http_request(server.api, "POST", "/api/v1/disconnect", ADMIN_KEY, body);
    assert_eq!(r.json(), serde_json::json!({ "disconnected": 0 }));
}

#[test]
fn disconnect_user_closes_exactly_their_connections() {
    let server = TestServer::start(|_| {});
    let mut frank = connect_spread(server.listen, "shop", "frank", 3);
    let (mut grace, _) = connect_user(server.listen, "shop", "grace");
    let (mut blog_frank, _) = connect_user(server.listen, "blog", "frank");
    server.wait_connections(frank.len() + 2);

    let body = r#"{"project":"shop","user":"frank"}"#;
    let r = http_request(server.api, "POST", "/api/v1/disconnect", BLOG_API_KEY, body);
    assert_refusal(&r, 403, "forbidden");
    let r = http_request(server.api, "POST", "/api/v1/disconnect", SHOP_API_KEY, body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({ "disconnected": frank.len() }));
    for (ws, _) in frank.iter_mut() {
        assert_eq!(expect_close(ws).0, 4003);
    }
    // Others untouched: same user in another project, another user.
    for ws in [&mut grace, &mut blog_frank] {
        assert_eq!(request(ws, r#"{"op":"ping","id":2}"#)["type"], "pong");
    }
    server.wait_connections(2);
    let r = http_request(server.api, "POST", "/api/v1/disconnect", ADMIN_KEY, body);
    assert_eq!(r.json(), serde_json::json!({ "disconnected": 0 }));

    for bad in [
        r#"{"project":"shop"}"#,
        r#"{"project":"shop","user":""}"#,
        "nope",
    ] {
        let r = http_request(server.api, "POST", "/api/v1/disconnect", ADMIN_KEY, bad);
        assert_refusal(&r, 400, "bad_request");
    }
    let r = http_request(
        server.api,
        "POST",
        "/api/v1/disconnect",
        ADMIN_KEY,
        r#"{"project":"nope","user":"x"}"#,
    );
    assert_refusal(&r, 404, "unknown_project");
}

#[test]
fn stats_count_connections_per_shard_and_project() {
    let server = TestServer::start(|_| {});
    let conns = connect_spread(server.listen, "shop", "hank", 3);
    let (_b, b_w) = connect_user(server.listen, "blog", "ivy");
    server.wait_connections(conns.len() + 1);
    let r = get(server.api, SHOP_API_KEY, "/api/v1/stats");
    assert_refusal(&r, 403, "forbidden");
    let before = get(server.api, ADMIN_KEY, "/api/v1/stats").json();
    server.publish("shop", "all", "1");
    wait_until("delivery counted", || {
        let v = get(server.api, ADMIN_KEY, "/api/v1/stats").json();
        v["messages"]["delivered"].as_u64()
            == Some(before["messages"]["delivered"].as_u64().unwrap() + conns.len() as u64)
    });
    let v = get(server.api, ADMIN_KEY, "/api/v1/stats").json();
    assert_eq!(v["connections"], conns.len() as u64 + 1);
    let per_shard: BTreeMap<u64, u64> = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["shard"].as_u64().unwrap(),
                s["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut expected = BTreeMap::from([(0, 0), (1, 0)]);
    for (_, w) in &conns {
        *expected.get_mut(&u64::from(w.shard)).unwrap() += 1;
    }
    *expected.get_mut(&u64::from(b_w.shard)).unwrap() += 1;
    assert_eq!(per_shard, expected);
    assert_eq!(v["projects"]["shop"]["connections"], conns.len() as u64);
    assert_eq!(v["projects"]["blog"]["connections"], 1);
    assert_eq!(
        v["messages"]["published"].as_u64().unwrap(),
        before["messages"]["published"].as_u64().unwrap() + 1
    );
    assert!(v["shards"][0]["inbox_depth"].is_u64());
}

#[test]
fn metrics_move_with_connections_and_messages() {
    let server = TestServer::start(|_| {});
    let before = scrape(server.api);
    assert_eq!(metric(&before, "herald_connections", ""), 0.0);
    let mut conns = connect_spread(server.listen, "shop", "m", 3);
    let (_blog, _) = connect_user(server.listen, "blog", "n");
    let n = conns.len() as f64;
    server.wait_connections(conns.len() + 1);
    // A refused handshake is counted under its reason.
    let refused = http(
        server.listen,
        upgrade_request("/ws/shop", "Authorization: Bearer nope\r\n").as_bytes(),
    );
    assert_eq!(refused.status, 401);

    let s = scrape(server.api);
    assert_eq!(metric(&s, "herald_connections", ""), n + 1.0);
    for shard in [0u16, 1] {
        let on = conns.iter().filter(|(_, w)| w.shard == shard).count() as f64;
        let blog_here = metric(&s, "herald_connections", &format!("shard=\"{shard}\"")) - on;
        assert!(blog_here == 0.0 || blog_here == 1.0, "shard {shard}: {s:?}");
    }
    assert_eq!(
        metric(&s, "herald_project_connections", "project=\"shop\""),
        n
    );
    assert_eq!(
        metric(&s, "herald_project_connections", "project=\"blog\""),
        1.0
    );
    assert_eq!(
        metric(&s, "herald_handshakes_total", "outcome=\"accepted\""),
        n + 1.0
    );
    assert_eq!(
        metric(&s, "herald_handshakes_total", "outcome=\"unauthorized\""),
        1.0
    );
    assert!(metric(&s, "herald_bytes_in_total", "") > 0.0);
    assert!(metric(&s, "herald_bytes_out_total", "") > 0.0);

    // Publish to the shop connections: delivered grows by exactly their number.
    let id = server.publish("shop", "all", r#"{"x":1}"#);
    for (ws, _) in conns.iter_mut() {
        expect_message(ws, "all", r#"{"x":1}"#, &id, 0);
    }
    let after = scrape(server.api);
    assert_eq!(
        metric(&after, "herald_messages_delivered_total", "")
            - metric(&s, "herald_messages_delivered_total", ""),
        n
    );
    assert_eq!(
        metric(&after, "herald_messages_published_total", "")
            - metric(&s, "herald_messages_published_total", ""),
        1.0
    );
    // Each shard recorded the publication in its latency histogram.
    for shard in ["0", "1"] {
        let label = format!("shard=\"{shard}\"");
        assert_eq!(
            metric(&after, "herald_publish_enqueue_seconds_count", &label)
                - metric(&s, "herald_publish_enqueue_seconds_count", &label),
            1.0
        );
        let inf = format!("le=\"+Inf\",{label}");
        assert_eq!(
            metric(&after, "herald_publish_enqueue_seconds_bucket", &inf),
            metric(&after, "herald_publish_enqueue_seconds_count", &label)
        );
    }
    assert!(metric(&after, "herald_shard_inbox_depth", "") >= 0.0);

    // Kick one: 4003 counted, connections drop by one.
    let (mut ws, w) = conns.pop().unwrap();
    let r = http_request(
        server.api,
        "DELETE",
        &format!("/api/v1/connections/{}", w.conn),
        ADMIN_KEY,
        "",
    );
    assert_eq!(r.status, 204);
    assert_eq!(expect_close(&mut ws).0, 4003);
    server.wait_connections(conns.len() + 1);
    let last = scrape(server.api);
    assert_eq!(metric(&last, "herald_closes_total", "code=\"4003\""), 1.0);
    assert_eq!(metric(&last, "herald_connections", ""), n);
}

#[test]
fn readyz_is_503_while_draining() {
    let server = TestServer::start(|c| c.server.drain_timeout_ms = 5000);
    let api = server.api;
    let r = http_request(api, "GET", "/readyz", "", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"status": "ready"}));
    let r = http_request(api, "GET", "/healthz", "", "");
    assert_eq!(r.status, 200);
    // A client that does not read its close frame yet keeps the drain going.
    let (mut ws, _) = connect_user(server.listen, "shop", "slowpoke");
    server.wait_connections(1);
    let join = server.drain_in_background();
    let r = http_request(api, "GET", "/readyz", "", "");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({"status": "draining"}));
    // Liveness is unaffected by the drain.
    assert_eq!(http_request(api, "GET", "/healthz", "", "").status, 200);
    // Still draining while the client holds on.
    assert!(!join.is_finished());
    assert_eq!(http_request(api, "GET", "/readyz", "", "").status, 503);
    assert_eq!(expect_close(&mut ws).0, 1001);
    join.join().expect("server joined");
}

#[test]
fn a_page_costs_the_page_not_the_shard() {
    let server = TestServer::start(|c| c.server.shards = 1);
    let visited = || server.stat(|s| herald::metrics::read(&s.list_visited));
    // Shop's three connections around many of blog's, all on the one shard.
    let mut conns = vec![connect_user(server.listen, "shop", "s0")];
    for i in 0..200 {
        conns.push(connect_user(server.listen, "blog", &format!("u{i}")));
    }
    conns.push(connect_user(server.listen, "shop", "s1"));
    conns.push(connect_user(server.listen, "shop", "s2"));

    // Shop's connections, two a page (each request asks for a page plus one).
    let before = visited();
    let ids = list_all(server.api, SHOP_API_KEY, "", 2);
    assert_eq!(ids.len(), 3);
    let cost = visited() - before;
    assert!(cost <= 6, "two pages of shop visited {cost} entries");

    // Blog's `all` subscribers, ten: one page, not every subscriber.
    let before = visited();
    let r = get(
        server.api,
        BLOG_API_KEY,
        "/api/v1/connections?topic=all&limit=10",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let page = r.json()["connections"].as_array().expect("page").len();
    assert_eq!(page, 10);
    let cost = visited() - before;
    assert!(cost <= 11, "a page of `all` visited {cost} entries");

    // The same across every project, with the admin key.
    let before = visited();
    let r = get(
        server.api,
        ADMIN_KEY,
        "/api/v1/connections?topic=all&limit=10",
    );
    assert_eq!(r.json()["connections"].as_array().map(Vec::len), Some(10));
    let cost = visited() - before;
    assert!(cost <= 11, "an admin page of `all` visited {cost} entries");

    // One user: their topic's subscribers only.
    let before = visited();
    let r = get(server.api, BLOG_API_KEY, "/api/v1/connections?user=u7");
    assert_eq!(r.json()["connections"].as_array().map(Vec::len), Some(1));
    let cost = visited() - before;
    assert!(cost <= 1, "one user's listing visited {cost} entries");

    for (ws, _) in conns {
        close(ws);
    }
}

/// The query is form-encoded: a `+` in a `sub` is sent as `%2B`; a bare `+` is a space.
#[test]
fn a_user_with_a_plus_is_listed_when_the_plus_is_percent_encoded() {
    let server = TestServer::start(|_| {});
    let (ws, welcome) = connect_user(server.listen, "shop", "alice+tag@example.com");
    server.wait_connections(1);
    let users = |query: &str| -> Vec<(String, String)> {
        let r = get(
            server.api,
            SHOP_API_KEY,
            &format!("/api/v1/connections?{query}"),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["connections"]
            .as_array()
            .expect("connections")
            .iter()
            .map(|c| {
                (
                    c["id"].as_str().expect("id").to_owned(),
                    c["user"].as_str().expect("user").to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        users("user=alice%2Btag@example.com"),
        [(welcome.conn.clone(), "alice+tag@example.com".to_owned())]
    );
    assert_eq!(users("user=alice+tag@example.com"), []);
    close(ws);
}

/// A wrongly typed field's value (it may be a secret) is not echoed by `POST /api/v1/projects`.
#[test]
fn an_invalid_project_body_does_not_echo_its_values() {
    let server = TestServer::start(|_| {});
    let secret = "sk-live-do-not-echo-0123456789";
    for body in [
        format!(r#"{{"id":"fresh","max_connections":"{secret}"}}"#),
        format!(r#"{{"id":"fresh","enabled":"{secret}"}}"#),
        format!(r#"{{"id":"fresh","leeway_secs":"{secret}"}}"#),
    ] {
        let r = http_request(server.api, "POST", "/api/v1/projects", ADMIN_KEY, &body);
        assert_refusal(&r, 400, "bad_request");
        let message = r.json()["message"].as_str().expect("message").to_owned();
        assert!(
            message.starts_with("invalid project: invalid type: "),
            "{message}"
        );
        assert!(!r.text().contains("sk-live"), "{body}: {message}");
    }
}
