//! The embedded store: projects and keys made through the API, persisted in the state
//! directory as one JSON document replaced atomically (write a temporary file, fsync, rename
//! over the old one, fsync the directory). A crash at any point leaves either the old or the
//! new document, never half of one. An exclusive lock on the directory keeps a second herald
//! from writing the same state.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::keys::KeySpec;
use crate::config::ProjectConfig;

/// File name of the state document.
pub const STATE_FILE: &str = "state.json";
/// Version of the document format.
pub const STATE_VERSION: u32 = 1;

/// What the API changed, per project.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Format version.
    #[serde(default)]
    pub version: u32,
    /// By project id.
    #[serde(default)]
    pub projects: BTreeMap<String, ProjectState>,
}

/// API changes of one project.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProjectState {
    /// Settings of a project created through the API (`None` for a config project).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<ProjectConfig>,
    /// Keys registered through the API, by kid (they replace a config key of the same kid).
    #[serde(default)]
    pub keys: BTreeMap<String, KeySpec>,
    /// Kids deleted through the API (config keys stay deleted across restarts).
    #[serde(default)]
    pub revoked: BTreeSet<String>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O on the state directory.
    #[error("state directory {dir}: {source}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another process holds the lock.
    #[error("state directory {0} is in use by another herald (lock held)")]
    Locked(PathBuf),
    /// The document does not parse.
    #[error("{path} is not a valid herald state document: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// serde's message.
        message: String,
    },
}

/// The state directory, locked for this process.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// Held for the life of the store (flock is released when the file closes).
    _lock: File,
}

/// The default state directory (see `server.state_dir`).
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may pass several, colon-separated; the first is ours.
        let first = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        return PathBuf::from(first);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("herald");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".local/state/herald");
    }
    PathBuf::from("herald-state")
}

/// Reads the state document of `dir` without locking it (for tools such as `herald token`
/// beside a running server; the document is replaced atomically, so a read sees a whole one).
/// No document yet is the empty state. A document that is not a JSON object, or that was
/// written by a newer herald (`version` above [`STATE_VERSION`]), is refused rather than read
/// as empty or half understood.
///
/// # Errors
/// [`StoreError::Io`] or [`StoreError::Corrupt`].
pub fn read_state(dir: &Path) -> Result<State, StoreError> {
    let path = dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::default()),
        Err(source) => {
            return Err(StoreError::Io {
                dir: dir.to_owned(),
                source,
            });
        }
    };
    let corrupt = |message: String| StoreError::Corrupt {
        path: path.clone(),
        message,
    };
    // Parsed as a value first: serde reads a struct from an array too (`[]` would be an empty
    // state), and the version must be checked before the fields it governs.
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| corrupt(crate::redact::redact_values(&e.to_string())))?;
    let Some(root) = doc.as_object() else {
        return Err(corrupt(format!(
            "the document must be a JSON object, not {}",
            json_kind(&doc)
        )));
    };
    if let Some(v) = root.get("version") {
        match v.as_u64() {
            Some(v) if v <= u64::from(STATE_VERSION) => {}
            Some(v) => {
                return Err(corrupt(format!(
                    "version {v} was written by a newer herald (this one reads up to \
                     {STATE_VERSION})"
                )));
            }
            None => {
                return Err(corrupt(format!(
                    "`version` must be an integer, not {}",
                    json_kind(v)
                )));
            }
        }
    }
    serde_json::from_value(doc).map_err(|e| corrupt(crate::redact::redact_values(&e.to_string())))
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl Store {
    /// Opens (creating it, mode 0700) and locks the state directory.
    ///
    /// # Errors
    /// [`StoreError::Io`] or [`StoreError::Locked`].
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io_err = |source| StoreError::Io {
            dir: dir.to_owned(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("lock"))
            .map_err(io_err)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Locked(dir.to_owned()));
        }
        Ok(Self {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the state (empty when there is none yet). A temporary file left by a crash is
    /// ignored: the rename never happened, so the old document is the truth.
    ///
    /// # Errors
    /// [`StoreError::Io`] or [`StoreError::Corrupt`].
    pub fn load(&self) -> Result<State, StoreError> {
        read_state(&self.dir)
    }

    /// Replaces the state atomically and durably.
    ///
    /// # Errors
    /// [`StoreError::Io`]; the previous document is then still in place.
    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        let io_err = |source| StoreError::Io {
            dir: self.dir.clone(),
            source,
        };
        let mut doc = state.clone();
        doc.version = STATE_VERSION;
        let bytes = serde_json::to_vec_pretty(&doc).expect("state always serialises");
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err)?;
        f.write_all(&bytes).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        drop(f);
        std::fs::rename(&tmp, self.dir.join(STATE_FILE)).map_err(io_err)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "herald-store-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn save_load_and_lock() {
        let d = tmp();
        let s = Store::open(&d).unwrap();
        assert_eq!(s.load().unwrap(), State::default());
        let mut st = State::default();
        st.projects
            .entry("shop".into())
            .or_default()
            .revoked
            .insert("k1".into());
        s.save(&st).unwrap();
        assert_eq!(s.load().unwrap().projects, st.projects);
        assert!(matches!(Store::open(&d), Err(StoreError::Locked(_))));
        drop(s);
        let s = Store::open(&d).unwrap();
        // A temporary file left by a crash before the rename changes nothing.
        std::fs::write(d.join("state.json.tmp"), b"{half").unwrap();
        assert_eq!(s.load().unwrap().projects, st.projects);
        std::fs::write(d.join(STATE_FILE), b"{half").unwrap();
        assert!(matches!(s.load(), Err(StoreError::Corrupt { .. })));
    }

    /// A root that is not an object, or a version from the future, is refused (naming the
    /// file and what is wrong), not read as an empty state; the file is left as it is.
    #[test]
    fn non_object_root_and_future_version_are_refused() {
        let d = tmp();
        let s = Store::open(&d).unwrap();
        for (doc, says) in [
            ("[]", "must be a JSON object, not an array"),
            (r#"[{"version":1}]"#, "not an array"),
            ("null", "not null"),
            ("7", "not a number"),
            (
                r#"{"version":2,"projects":{}}"#,
                "version 2 was written by a newer herald",
            ),
            (r#"{"version":"1"}"#, "`version` must be an integer"),
        ] {
            std::fs::write(d.join(STATE_FILE), doc).unwrap();
            let err = s.load().unwrap_err().to_string();
            assert!(
                err.contains(says) && err.contains(STATE_FILE),
                "{doc}: {err}"
            );
            assert_eq!(std::fs::read_to_string(d.join(STATE_FILE)).unwrap(), doc);
        }
        std::fs::write(d.join(STATE_FILE), r#"{"version":1,"projects":{}}"#).unwrap();
        assert_eq!(s.load().unwrap().version, 1);
        std::fs::write(d.join(STATE_FILE), "{}").unwrap();
        assert_eq!(s.load().unwrap(), State::default());
    }
}
