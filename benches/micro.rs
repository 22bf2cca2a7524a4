//! Criterion micro-benchmarks of herald's hot paths (issue 3, deliverable 3).
//!
//! - `frame`: server frame encoding (`ws::frame::text`) and the delivery frame of a publish
//!   (`hub::message_frame`).
//! - `jwt_verify`: `Project::verify` per token algorithm, against a project built from a
//!   `Config` whose keys are generated at bench start.
//! - `topic_index`: subscribe/unsubscribe of 10k personal topics, and churn on one topic with
//!   10k subscribers.
//! - `fanout_local`: queueing one shared frame (`push_frame`) to 10k open connections. Queues
//!   only: nothing is flushed and no socket is touched (every connection's fd is -1).
//!   `push_stomp_message_10k` does the same for a STOMP publication to 10k subscriptions
//!   `sub-0` (as stomp.js numbers them): each delivery is one shared piece, as a herald.v1 one.
//!
//! Run with `cargo bench --bench micro`; `cargo test --benches` runs each body once.
//! Groups that work on 10k items set `Throughput::Elements`, so the reported time divided by
//! 10,000 is the per-operation (per-delivery) cost.

use std::cell::RefCell;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::auth::{Claims, Registry};
use herald::config::{Config, KeyConfig, ProjectConfig, Secret};
use herald::pubsub::{Sub, TopicIndex, Unsubscribed};
use herald::ws::codec::stomp;
use herald::ws::conn::{Conn, ConnPhase, Push, StompHeads, push_frame, push_stomp_message};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use slab::Slab;

/// Connections / topics / subscribers in the 10k benches.
const N: usize = 10_000;

/// A typical publish: a small JSON object, as a backend sends it.
const DATA: &str = r#"{"kind":"order.updated","order_id":"A-1029384","status":"shipped","eta":"2025-06-01T12:00:00Z"}"#;

/// Id and timestamp shaped like the hub's (`<boot ms hex>-<seq hex>`, ms since the epoch).
const MSG_ID: &str = "1976b1f3c2a-2f1c";
const TS: u64 = 1_749_000_000_123;

fn bench_frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for (name, len) in [("64B", 64usize), ("1KiB", 1024), ("64KiB", 64 * 1024)] {
        let payload = vec![b'x'; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("text", name), &payload, |b, p| {
            b.iter(|| herald::ws::frame::text(black_box(p)));
        });
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("message_frame", |b| {
        b.iter(|| {
            herald::hub::message_frame(
                black_box("orders.eu"),
                black_box(DATA),
                black_box(MSG_ID),
                black_box(TS),
            )
        });
    });
    g.finish();
}

/// Key material of one algorithm: the verifying side for the config, the signing side for
/// minting tokens.
struct BenchKey {
    alg: Algorithm,
    kid: &'static str,
    config: KeyConfig,
    encoding: EncodingKey,
}

fn pem_key(alg: Algorithm, kid: &'static str, public_pem: &str, enc: EncodingKey) -> BenchKey {
    BenchKey {
        alg,
        kid,
        config: KeyConfig {
            kid: Some(kid.into()),
            alg: format!("{alg:?}"),
            pem: Some(public_pem.into()),
            ..KeyConfig::default()
        },
        encoding: enc,
    }
}

/// Generates one key of every benchmarked algorithm (RSA 2048 shared by RS256 and PS256).
fn generate_keys() -> Vec<BenchKey> {
    use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
    use rsa::pkcs8::LineEnding;
    use rsa::rand_core::{OsRng, RngCore};

    let secret = "bench-hmac-secret-0123456789abcdef";
    let mut keys = vec![BenchKey {
        alg: Algorithm::HS256,
        kid: "hs256",
        config: KeyConfig {
            kid: Some("hs256".into()),
            alg: "HS256".into(),
            secret: Some(Secret(secret.into())),
            ..KeyConfig::default()
        },
        encoding: EncodingKey::from_secret(secret.as_bytes()),
    }];

    let rsa_key = rsa::RsaPrivateKey::new(&mut OsRng, 2048).expect("RSA key generation");
    let rsa_private = rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(&rsa_key, LineEnding::LF)
        .expect("RSA private PEM");
    let rsa_public =
        rsa::pkcs8::EncodePublicKey::to_public_key_pem(&rsa_key.to_public_key(), LineEnding::LF)
            .expect("RSA public PEM");
    for (alg, kid) in [(Algorithm::RS256, "rs256"), (Algorithm::PS256, "ps256")] {
        let enc = EncodingKey::from_rsa_pem(rsa_private.as_bytes()).expect("RSA encoding key");
        keys.push(pem_key(alg, kid, &rsa_public, enc));
    }

    let p256_key = p256::SecretKey::random(&mut OsRng);
    let private = p256_key.to_pkcs8_pem(LineEnding::LF).expect("P-256 PEM");
    let public = p256_key
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("P-256 public PEM");
    let enc = EncodingKey::from_ec_pem(private.as_bytes()).expect("ES256 encoding key");
    keys.push(pem_key(Algorithm::ES256, "es256", &public, enc));

    let p384_key = p384::SecretKey::random(&mut OsRng);
    let private = p384_key.to_pkcs8_pem(LineEnding::LF).expect("P-384 PEM");
    let public = p384_key
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("P-384 public PEM");
    let enc = EncodingKey::from_ec_pem(private.as_bytes()).expect("ES384 encoding key");
    keys.push(pem_key(Algorithm::ES384, "es384", &public, enc));

    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let ed_key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let private = ed_key.to_pkcs8_pem(LineEnding::LF).expect("Ed25519 PEM");
    let public = ed_key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("Ed25519 public PEM");
    let enc = EncodingKey::from_ed_pem(private.as_bytes()).expect("EdDSA encoding key");
    keys.push(pem_key(Algorithm::EdDSA, "eddsa", &public, enc));

    keys
}

fn bench_jwt_verify(c: &mut Criterion) {
    let keys = generate_keys();
    let cfg = Config {
        projects: vec![ProjectConfig {
            id: "bench".into(),
            keys: keys.iter().map(|k| k.config.clone()).collect(),
            ..ProjectConfig::default()
        }],
        ..Config::default()
    };
    let registry = Registry::from_config(&cfg).expect("registry from the bench config");
    let project = registry.project("bench").expect("bench project").clone();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = Claims {
        sub: "user-1029384".into(),
        exp: Some(now + 24 * 3600),
        topics: Some(vec!["orders.*".into(), "news".into()]),
        device: Some("phone-7".into()),
    };

    let mut g = c.benchmark_group("jwt_verify");
    g.throughput(Throughput::Elements(1));
    for k in &keys {
        let mut header = Header::new(k.alg);
        header.kid = Some(k.kid.into());
        let token = jsonwebtoken::encode(&header, &claims, &k.encoding).expect("sign token");
        let verified = project.verify(&token).expect("bench token verifies");
        assert_eq!(verified.claims, claims);
        assert_eq!(verified.kid.as_deref(), Some(k.kid));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{:?}", k.alg)),
            &token,
            |b, t| b.iter(|| project.verify(black_box(t)).expect("verifies")),
        );
    }
    g.finish();
}

fn bench_topic_index(c: &mut Criterion) {
    let mut g = c.benchmark_group("topic_index");
    g.throughput(Throughput::Elements(N as u64));

    // Every connection's personal topic: 10k one-subscriber topics created, then removed. The
    // index is reused across iterations, as a shard's is.
    let names: Vec<String> = (0..N).map(|i| format!("user.{i}")).collect();
    let mut ix = TopicIndex::default();
    let mut subs: Vec<Sub> = Vec::with_capacity(N);
    g.bench_function("user_topics_10k/subscribe+unsubscribe", |b| {
        b.iter(|| {
            for (slot, name) in names.iter().enumerate() {
                subs.push(ix.subscribe(0, name, slot as u32).sub);
            }
            for s in subs.drain(..) {
                black_box(ix.unsubscribe(s));
            }
        });
    });
    assert_eq!(ix.nr_topics(), 0);

    // One topic with 10k subscribers: one subscriber leaves and comes back (unsubscribe +
    // subscribe, with the position fix-up the shard does). 10k churn ops per iteration,
    // walking the subscribers in a scattered order.
    let mut ix = TopicIndex::default();
    let mut subs: Vec<Sub> = (0..N)
        .map(|s| ix.subscribe(0, "news", s as u32).sub)
        .collect();
    let order: Vec<u32> = (0..N).map(|i| ((i * 7919) % N) as u32).collect();
    g.bench_function("one_topic_10k_subs/churn", |b| {
        b.iter(|| {
            for &slot in &order {
                let s = subs[slot as usize];
                if let Unsubscribed::Remaining(Some(moved)) = ix.unsubscribe(s) {
                    subs[moved as usize].pos = s.pos;
                }
                subs[slot as usize] = ix.subscribe(0, black_box("news"), slot).sub;
            }
        });
    });
    let t = ix.lookup(0, "news").expect("news still has subscribers");
    assert_eq!(ix.subscribers(t).len(), N);
    for (slot, s) in subs.iter().enumerate() {
        assert_eq!(ix.subscribers(s.topic)[s.pos as usize], slot as u32);
    }
    g.finish();
}

/// A shard's connection table and dirty list, with `N` open connections.
struct Table {
    conns: Slab<Conn>,
    dirty: herald::ws::conn::Dirty,
}

impl Table {
    fn new() -> Self {
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("address");
        let mut conns = Slab::with_capacity(N);
        for generation in 0..N as u32 {
            // fd -1: never a real socket; push_frame only queues and nothing here flushes.
            let mut c = Conn::new(-1, generation, peer);
            c.phase = ConnPhase::Open;
            conns.insert(c);
        }
        Self {
            conns,
            dirty: herald::ws::conn::Dirty {
                slots: Vec::with_capacity(N),
                queued_bytes: 0,
            },
        }
    }

    /// Back to "every queue flushed". `cold` drops the in-flight state and the queue's memory
    /// as a flush does (the next push allocates both); otherwise each queue keeps its
    /// capacity.
    fn reset(&mut self, cold: bool) {
        for (_, c) in &mut self.conns {
            if cold {
                c.flight = None;
            } else if let Some(f) = c.flight.as_deref_mut() {
                f.out.clear();
                f.out_bytes = 0;
                f.out_head = 0;
            }
            c.dirty = false;
        }
        self.dirty.slots.clear();
        self.dirty.queued_bytes = 0;
    }
}

fn bench_fanout_local(c: &mut Criterion) {
    let frame = herald::hub::message_frame("news", DATA, MSG_ID, TS);
    let cap = Config::default().ws.max_outbound_queue_bytes;
    let table = RefCell::new(Table::new());

    let mut g = c.benchmark_group("fanout_local");
    g.throughput(Throughput::Elements(N as u64));

    for (name, cold) in [
        ("push_frame_10k/cold_queues", true),
        ("push_frame_10k/warm_queues", false),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || table.borrow_mut().reset(cold),
                |()| {
                    let t = &mut *table.borrow_mut();
                    for slot in 0..N as u32 {
                        let r = push_frame(&mut t.conns, &mut t.dirty, slot, &[&frame], cap);
                        debug_assert_eq!(r, Push::Queued);
                    }
                },
                BatchSize::PerIteration,
            );
        });
    }

    // The shard's own loop: look the topic up, walk its subscribers, queue to each.
    let mut ix = TopicIndex::default();
    for slot in 0..N as u32 {
        ix.subscribe(0, "news", slot);
    }
    g.bench_function("topic_10k_subs/cold_queues", |b| {
        b.iter_batched(
            || table.borrow_mut().reset(true),
            |()| {
                let t = &mut *table.borrow_mut();
                let topic = ix.lookup(0, black_box("news")).expect("topic");
                let mut delivered = 0u64;
                for &slot in ix.subscribers(topic) {
                    if push_frame(&mut t.conns, &mut t.dirty, slot, &[&frame], cap) == Push::Queued
                    {
                        delivered += 1;
                    }
                }
                delivered
            },
            BatchSize::PerIteration,
        );
    });

    // STOMP: one subscription `sub-0` to the topic per connection; the publication's frame is
    // made once and every delivery queues it by reference, in one piece.
    let sessions: Vec<stomp::Session> = (0..N)
        .map(|_| stomp::Session {
            subs: vec![stomp::Subscription {
                id: "sub-0".into(),
                topic: 0,
                destination: "/topic/news".into(),
                client_ack: false,
            }],
            ..stomp::Session::default()
        })
        .collect();
    let shared = [
        stomp::message_shared(MSG_ID, DATA.len()),
        bytes::Bytes::from_static(DATA.as_bytes()),
        stomp::NUL.clone(),
    ];
    g.bench_function("push_stomp_message_10k/cold_queues", |b| {
        b.iter_batched(
            || table.borrow_mut().reset(true),
            |()| {
                let t = &mut *table.borrow_mut();
                let mut heads = StompHeads::new(MSG_ID, &shared);
                for (slot, s) in sessions.iter().enumerate() {
                    let r = push_stomp_message(
                        &mut t.conns,
                        &mut t.dirty,
                        slot as u32,
                        s,
                        0,
                        &mut heads,
                        cap,
                    );
                    debug_assert_eq!(r, Some(Push::Queued));
                }
            },
            BatchSize::PerIteration,
        );
    });
    g.finish();

    // The last fan-out queued one frame to every connection (when a filter left the
    // fan-out benches out, nothing ran and there is nothing to check).
    let t = table.borrow();
    if !t.dirty.slots.is_empty() {
        assert_eq!(t.dirty.slots.len(), N);
        assert!(
            t.conns
                .iter()
                .all(|(_, c)| c.flight.as_ref().is_some_and(|f| f.out.len() == 1) && c.dirty)
        );
        let first_of =
            |c: &herald::ws::conn::Conn| c.flight.as_ref().expect("queued").out[0].bytes.as_ptr();
        let first = first_of(&t.conns[0]);
        assert!(
            t.conns.iter().all(|(_, c)| first_of(c) == first),
            "one STOMP frame, shared by every delivery"
        );
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = micro;
    config = config();
    targets = bench_frame, bench_jwt_verify, bench_topic_index, bench_fanout_local
}
criterion_main!(micro);
