//! The parent's side of the workers: starts them (tasks or child processes), sends commands,
//! keeps the latest progress of each, and hands the other events to the scenario in order.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::worker::{self, Cmd, Event, Progress, WorkerSpec};

/// The running workers.
pub struct Fleet {
    cmds: Vec<mpsc::UnboundedSender<Cmd>>,
    events: mpsc::UnboundedReceiver<(usize, Event)>,
    progress: Arc<Mutex<Vec<Progress>>>,
    children: Vec<Child>,
}

impl Fleet {
    /// Starts one worker per spec: in this process when `processes` is false, else as child
    /// processes of this executable with `threads` runtime threads each.
    ///
    /// # Errors
    /// A child could not be started.
    pub async fn start(specs: Vec<WorkerSpec>, processes: bool, threads: usize) -> Result<Self> {
        let n = specs.len();
        let progress = Arc::new(Mutex::new(vec![Progress::default(); n]));
        let (all_tx, mut all_rx) = mpsc::unbounded_channel::<(usize, Event)>();
        let (out_tx, out_rx) = mpsc::unbounded_channel::<(usize, Event)>();
        let mut cmds = Vec::with_capacity(n);
        let mut children = Vec::new();
        for spec in specs {
            let idx = spec.index;
            let (cmd_tx, cmd_rx) = mpsc::unbounded_channel::<Cmd>();
            cmds.push(cmd_tx);
            if processes {
                let exe = std::env::current_exe().context("locating herald-bench")?;
                let mut child = Command::new(exe)
                    .arg("worker")
                    .arg("--threads")
                    .arg(threads.max(1).to_string())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .context("starting a worker process")?;
                let mut stdin = child.stdin.take().context("worker stdin")?;
                let stdout = child.stdout.take().context("worker stdout")?;
                let mut first = serde_json::to_string(&spec)?;
                first.push('\n');
                stdin.write_all(first.as_bytes()).await?;
                stdin.flush().await?;
                let mut cmd_rx = cmd_rx;
                tokio::spawn(async move {
                    while let Some(c) = cmd_rx.recv().await {
                        let mut line = serde_json::to_string(&c).unwrap_or_default();
                        line.push('\n');
                        if stdin.write_all(line.as_bytes()).await.is_err()
                            || stdin.flush().await.is_err()
                        {
                            return;
                        }
                    }
                });
                let tx = all_tx.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(stdout).lines();
                    let mut closed = false;
                    while let Ok(Some(line)) = lines.next_line().await {
                        match serde_json::from_str::<Event>(&line) {
                            Ok(ev) => {
                                closed |= matches!(ev, Event::Closed);
                                let _ = tx.send((idx, ev));
                            }
                            Err(e) => {
                                let _ = tx.send((
                                    idx,
                                    Event::Fatal {
                                        message: format!("unreadable event ({e}): {line:.200}"),
                                    },
                                ));
                            }
                        }
                    }
                    if !closed {
                        let _ = tx.send((
                            idx,
                            Event::Fatal {
                                message: "worker process exited".into(),
                            },
                        ));
                    }
                });
                children.push(child);
            } else {
                let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
                let tx = all_tx.clone();
                tokio::spawn(async move {
                    while let Some(ev) = ev_rx.recv().await {
                        let _ = tx.send((idx, ev));
                    }
                });
                let fatal = ev_tx.clone();
                tokio::spawn(async move {
                    if let Err(e) = worker::run(spec, cmd_rx, ev_tx).await {
                        let _ = fatal.send(Event::Fatal {
                            message: format!("{e:#}"),
                        });
                    }
                });
            }
        }
        drop(all_tx);
        let prog = progress.clone();
        tokio::spawn(async move {
            while let Some((idx, ev)) = all_rx.recv().await {
                match ev {
                    Event::Progress(p) => {
                        if let Some(slot) =
                            prog.lock().unwrap_or_else(|e| e.into_inner()).get_mut(idx)
                        {
                            *slot = p;
                        }
                    }
                    other => {
                        let _ = out_tx.send((idx, other));
                    }
                }
            }
        });
        Ok(Self {
            cmds,
            events: out_rx,
            progress,
            children,
        })
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    /// Sum of the workers' latest progress.
    pub fn totals(&self) -> Progress {
        let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.iter().fold(Progress::default(), |a, b| Progress {
            connected: a.connected + b.connected,
            failed: a.failed + b.failed,
            delivered: a.delivered + b.delivered,
            ops: a.ops + b.ops,
            ops_failed: a.ops_failed + b.ops_failed,
        })
    }

    /// Sends `cmd` to every worker.
    pub fn send_all(&self, cmd: Cmd) {
        for c in &self.cmds {
            let _ = c.send(cmd.clone());
        }
    }

    /// Waits for one event picked by `pick` from every worker, calling `tick` every 100 ms
    /// meanwhile. Results are in worker order.
    ///
    /// # Errors
    /// A worker failed, or `limit` passed.
    pub async fn expect_all<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut pick: impl FnMut(Event) -> Option<T>,
        mut tick: impl FnMut(&Progress),
    ) -> Result<Vec<T>> {
        let n = self.len();
        let mut got: Vec<Option<T>> = (0..n).map(|_| None).collect();
        let deadline = tokio::time::Instant::now() + limit;
        let mut every = tokio::time::interval(Duration::from_millis(100));
        while got.iter().any(Option::is_none) {
            tokio::select! {
                ev = self.events.recv() => {
                    let Some((idx, ev)) = ev else { bail!("every worker is gone while waiting for {what}") };
                    if let Event::Fatal { message } = &ev {
                        bail!("worker {idx}: {message}");
                    }
                    if let Some(t) = pick(ev) {
                        got[idx] = Some(t);
                    }
                }
                _ = every.tick() => tick(&self.totals()),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(anyhow!("timed out after {limit:?} waiting for {what}"));
                }
            }
        }
        tick(&self.totals());
        Ok(got.into_iter().flatten().collect())
    }

    /// pids of the worker processes (empty when workers are tasks).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    /// Waits for the worker processes to exit (bounded), killing stragglers.
    pub async fn reap(&mut self) {
        for c in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }
}
