//! `herald check-host`: reports the real open-files limit of this machine and exits non-zero
//! when the target does not fit.

use std::process::Command;

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

fn hard_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    r.rlim_max
}

fn check_host(connections: u64) -> (Option<i32>, String) {
    let out = Command::new(HERALD)
        .args(["check-host", "--connections", &connections.to_string()])
        .output()
        .expect("run herald check-host");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code(), text)
}

fn row<'a>(table: &'a str, name: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no `{name}` row in:\n{table}"))
}

#[test]
fn reports_the_open_files_limit_and_fails_short() {
    let hard = hard_nofile();
    // The target must exceed this machine's limit (20,000 on the reference test machine).
    let target = (hard + 1).max(100_000);
    let (code, out) = check_host(target);
    assert_eq!(code, Some(1), "a shortfall exits 1:\n{out}");
    let nofile = row(&out, "RLIMIT_NOFILE (hard)");
    assert!(
        nofile.split_whitespace().any(|w| w == hard.to_string()),
        "the hard limit {hard} is reported: {nofile}"
    );
    assert!(nofile.contains("SHORT"), "{nofile}");
    // The ceiling is the hard limit less the reserved descriptors (when fs.file-max is larger).
    assert!(out.contains("connection ceiling on this host: "), "{out}");
    let profile = if target <= 100_000 { "c100k" } else { "c1m" };
    assert!(
        out.contains(&format!("tuning/herald-tune apply --profile {profile}")),
        "names the tuning profile:\n{out}"
    );
}

#[test]
fn small_target_passes() {
    let (code, out) = check_host(1000);
    assert_eq!(code, Some(0), "1000 connections fit:\n{out}");
    assert!(row(&out, "RLIMIT_NOFILE (hard)").contains("ok"), "{out}");
    assert!(out.contains("host limits ok"), "{out}");
}
