//! `herald-bench`: the capacity load generator (see `benches/herald-bench/README.md`).
//!
//! # Layout
//! - `cli`: the command line, one subcommand per scenario.
//! - `plan`: who subscribes to what and who must receive each publish (pure).
//! - `target`: herald and the peer contract behind one trait.
//! - `auth`: herald config reading and JWT minting.
//! - `net`: one client connection (source address, upgrade, welcome, subscribes).
//! - `worker`: holds a share of the connections and measures deliveries.
//! - `fleet`: the parent's side of the workers (tasks or child processes).
//! - `publish`: the HTTP publisher.
//! - `server`: starting herald and reading its ready line.
//! - `sys`: `/proc` readings (RSS, sockstat, CPU, machine) and the monotonic clock.
//! - `stats`: HDR histograms in transit and counters by reason.
//! - `run`: the parent's phases and the merged results.
//! - `report`, `svg`: JSON, markdown and plots.
//! - `recover`: the recovery scenario (clients of a topic with history reconnecting at once).

mod auth;
mod cli;
mod fleet;
mod net;
mod plan;
mod publish;
mod recover;
mod report;
mod run;
mod server;
mod stats;
mod svg;
mod sys;
mod target;
mod worker;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use cli::{Cli, Command};
use plan::{Kind, Plan};
use run::{DeliveryOpts, LoadOpts, Scenario};

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
}

fn scenario(cmd: Command) -> Option<Scenario> {
    let plan = |kind, common: &cli::Common, default_n: u64, rounds: u64| Plan {
        kind,
        nr_conns: common.connections.unwrap_or(default_n),
        nr_rounds: rounds,
        topic: "bench".into(),
        group_size: 10,
    };
    let delivery = |d: &cli::DeliveryArgs| DeliveryOpts {
        rate: d.rate,
        publishers: d.publishers,
        batch: d.batch,
        pad_bytes: d.pad_bytes,
        drain_timeout: Duration::from_secs(d.drain_timeout_secs),
    };
    let args = |v: &dyn erased::Ser| v.json();
    Some(match cmd {
        Command::Hold(a) => Scenario {
            kind: Kind::Hold,
            plan: plan(Kind::Hold, &a.common, 1000, 0),
            delivery: None,
            hold_secs: a.hold_secs,
            load: None,
            args: args(&a),
            common: a.common,
        },
        Command::Broadcast(a) => {
            let mut p = plan(
                Kind::Broadcast,
                &a.delivery.common,
                1000,
                a.delivery.messages,
            );
            p.topic = a.topic.clone();
            Scenario {
                kind: Kind::Broadcast,
                plan: p,
                delivery: Some(delivery(&a.delivery)),
                hold_secs: 0,
                load: None,
                args: args(&a),
                common: a.delivery.common,
            }
        }
        Command::Groups(a) => {
            let mut p = plan(Kind::Groups, &a.delivery.common, 1000, a.delivery.messages);
            p.group_size = a.group_size.max(1);
            Scenario {
                kind: Kind::Groups,
                plan: p,
                delivery: Some(delivery(&a.delivery)),
                hold_secs: 0,
                load: None,
                args: args(&a),
                common: a.delivery.common,
            }
        }
        Command::Unicast(a) => Scenario {
            kind: Kind::Unicast,
            plan: plan(Kind::Unicast, &a.common, 1000, a.messages),
            delivery: Some(delivery(&a)),
            hold_secs: 0,
            load: None,
            args: args(&a),
            common: a.common,
        },
        Command::Churn(a) => Scenario {
            kind: Kind::Churn,
            plan: plan(Kind::Churn, &a.common, 0, 0),
            delivery: None,
            hold_secs: 0,
            load: Some(LoadOpts {
                rate: a.rate,
                concurrency: 1,
                duration: Duration::from_secs(a.duration_secs),
                hold_ms: a.hold_ms,
                max_inflight: a.max_inflight,
                token_pool: a.token_pool,
            }),
            args: args(&a),
            common: a.common,
        },
        Command::Handshake(a) => Scenario {
            kind: Kind::Handshake,
            plan: plan(Kind::Handshake, &a.common, 0, 0),
            delivery: None,
            hold_secs: 0,
            load: Some(LoadOpts {
                rate: 0.0,
                concurrency: a.concurrency,
                duration: Duration::from_secs(a.duration_secs),
                hold_ms: 0,
                max_inflight: 0,
                token_pool: a.token_pool,
            }),
            args: args(&a),
            common: a.common,
        },
        Command::Worker { .. } | Command::Recover(_) => return None,
    })
}

/// Scenario arguments to JSON for the report, secrets excluded by their `serde(skip)`.
mod erased {
    pub trait Ser {
        fn json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> serde_json::Value {
            let mut v = serde_json::to_value(self).unwrap_or_default();
            // `common` is reported on its own.
            if let Some(o) = v.as_object_mut() {
                o.remove("common");
                if let Some(d) = o.get_mut("delivery").and_then(|d| d.as_object_mut()) {
                    d.remove("common");
                }
            }
            v
        }
    }
}

/// Success, or the error after `what` and a failure.
fn exit_code(what: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Worker { threads } = cli.command {
        let rt = match runtime(threads) {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("herald-bench worker: {e}");
                return ExitCode::from(2);
            }
        };
        let result = rt.block_on(worker::child_main());
        // The stdin reader sits in a blocking thread until the parent closes the pipe: do not
        // wait for it.
        rt.shutdown_timeout(Duration::from_millis(100));
        return exit_code("herald-bench worker", result);
    }
    if let Command::Recover(a) = cli.command {
        sys::raise_nofile_limit();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let result = runtime(threads)
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                let r = rt.block_on(recover::run(a));
                rt.shutdown_timeout(Duration::from_secs(1));
                r
            });
        return exit_code("herald-bench recover", result);
    }
    let Some(sc) = scenario(cli.command) else {
        return ExitCode::from(2);
    };
    sys::raise_nofile_limit();
    let threads = if sc.common.threads > 0 {
        sc.common.threads
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    };
    let rt = match runtime(threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let common = sc.common.clone();
    let result = rt
        .block_on(run::run(sc))
        .and_then(|r| report::write_all(&r, &common));
    // Connection tasks may still be winding down: do not wait for them.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
