//! What the process sets up about itself before it serves, in one place: transparent huge
//! pages off (unless `server.transparent_huge_pages`), the open-files soft limit raised to the
//! hard limit, the host check logged once, and the development-mode warning. Only the
//! `herald serve` path calls it ([`crate::lifecycle::run`]); a node started in code (tests)
//! leaves its process as it is.

use tracing::{info, warn};

use crate::config::Config;
use crate::system::hostcheck;

/// Prepares this process for `cfg`. `development` says the config is the embedded development
/// default (no file given). Call it before [`crate::settings::Settings::from_config`], which
/// reads the open-files limit this raises. Failures are logged, never fatal.
pub fn prepare(cfg: &Config, development: bool) {
    if !cfg.server.transparent_huge_pages {
        disable_transparent_huge_pages();
    }
    match hostcheck::raise_nofile() {
        Ok(Some((old, new))) => {
            info!(
                old,
                new, "raised the open-files soft limit to the hard limit"
            )
        }
        Ok(None) => {}
        Err(e) => warn!("could not raise the open-files soft limit: {e}"),
    }
    let report = hostcheck::check(cfg, None);
    if report.short() {
        warn!("{}", report.summary());
    } else {
        info!("{}", report.summary());
    }
    if development || cfg.uses_dev_keys() {
        warn!(
            "!!! DEVELOPMENT MODE: public development secrets are in use ({}). Loopback only. \
             Never run this in production: generate a config with `herald genconfig` !!!",
            cfg.dev_key_users().join(", ")
        );
    }
}

/// Idle connections are many small allocations, and 2 MiB pages inflate resident memory.
fn disable_transparent_huge_pages() {
    // SAFETY: prctl with integer arguments only; affects this process's memory map.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        warn!(
            "could not disable transparent huge pages: {}",
            std::io::Error::last_os_error()
        );
    }
}
