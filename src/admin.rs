//! Project and key management: every change (API call or SIGHUP reload) is applied to a copy
//! of the state, a new registry is built from it (which loads and checks every key), the state
//! is persisted atomically, and only then is the registry swapped in. A change that fails at
//! any step leaves both the running registry and the stored state as they were. Changes are
//! serialised by one mutex: this is the control plane, never the hot path. A change builds
//! only the project it touches (other projects' parsed keys are shared with the running
//! registry); a reload builds them all. Every method here may parse keys and fsync: the API
//! calls them on a blocking thread, never on its runtime.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::auth::{KeyError, KeySpec, Registry, RegistryError};
use crate::config::{
    Config, ConfigError, MAX_KEYS_PER_PROJECT, Overrides, ProjectConfig,
    keep_restart_only_settings, restart_only_changes, validate_project,
};
use crate::hub::Hub;
#[cfg(doc)]
use crate::shard::mailbox::ShardMsg;
use crate::store::{State, Store, StoreError};

/// Why a management change was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Bad input (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such project (404).
    #[error("no project `{0}`")]
    UnknownProject(String),
    /// No such key (404).
    #[error("project `{project}` has no key `{kid}`")]
    UnknownKey {
        /// Project.
        project: String,
        /// Key id.
        kid: String,
    },
    /// Already exists (409).
    #[error("{0}")]
    Conflict(String),
    /// Key document too large (413).
    #[error("{0}")]
    TooLarge(String),
    /// The state could not be persisted (503; nothing changed).
    #[error("cannot persist the change: {0}")]
    Store(#[from] StoreError),
}

impl From<RegistryError> for AdminError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Key {
                source: KeyError::TooLarge,
                ..
            } => Self::TooLarge(e.to_string()),
            other => Self::BadRequest(other.to_string()),
        }
    }
}

impl From<ConfigError> for AdminError {
    fn from(e: ConfigError) -> Self {
        Self::BadRequest(e.to_string())
    }
}

struct Inner {
    /// The config in force (replaced by a successful reload).
    config: Config,
    /// The API state in force.
    state: State,
}

/// The management handle, shared by the API and the signal thread.
pub struct Admin {
    hub: Arc<Hub>,
    store: Store,
    /// File to re-read on SIGHUP; `None` for the embedded default.
    config_path: Option<PathBuf>,
    /// Settings given on the command line: they win over the re-read file too.
    overrides: Overrides,
    inner: Mutex<Inner>,
}

/// Key ids: what a path segment and a JWT header can carry unambiguously.
pub fn valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= 128
        && kid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Admin {
    /// Wraps a loaded state; the registry in `hub` must have been built from `config` and
    /// `state`.
    pub fn new(
        hub: Arc<Hub>,
        store: Store,
        config: Config,
        state: State,
        config_path: Option<PathBuf>,
        overrides: Overrides,
    ) -> Self {
        Self {
            hub,
            store,
            config_path,
            overrides,
            inner: Mutex::new(Inner { config, state }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied change: changes are
        // built on copies and committed last.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds, persists and swaps in `state` (with `config`). `changed` names the one
    /// project the change touches: only it is rebuilt, the others are shared with the
    /// running registry; `None` rebuilds every project (a reload).
    fn commit(
        &self,
        inner: &mut Inner,
        config: Config,
        state: State,
        changed: Option<&str>,
    ) -> Result<(), AdminError> {
        let current = self.hub.registry.load_full();
        let registry = Registry::build_changed(&config, &state, Some(&current), changed)?;
        if state != inner.state {
            self.store.save(&state)?;
        }
        inner.state = state;
        inner.config = config;
        self.hub.registry.store(Arc::new(registry));
        Ok(())
    }

    /// `POST /api/v1/projects`: a new project, persisted.
    ///
    /// # Errors
    /// 400 invalid settings or keys, 409 the id exists.
    pub fn create_project(&self, p: ProjectConfig) -> Result<(), AdminError> {
        if p.api_key_file.is_some()
            || p.jwks_file.is_some()
            || p.keys
                .iter()
                .any(|k| k.secret_file.is_some() || k.pem_file.is_some())
        {
            return Err(AdminError::BadRequest(
                "file paths are not accepted over the API: send the key material itself".into(),
            ));
        }
        validate_project("project", &p)?;
        let mut inner = self.lock();
        if self.hub.registry.load().project(&p.id).is_some() {
            return Err(AdminError::Conflict(format!(
                "project `{}` already exists",
                p.id
            )));
        }
        let mut state = inner.state.clone();
        let id = p.id.clone();
        let entry = state.projects.entry(id.clone()).or_default();
        entry.settings = Some(p);
        entry.keys.clear();
        entry.revoked.clear();
        let config = inner.config.clone();
        self.commit(&mut inner, config, state, Some(&id))?;
        info!(project = %id, "project created");
        Ok(())
    }

    /// `PUT /api/v1/projects/{project}/keys/{kid}`: adds or replaces a key.
    ///
    /// # Errors
    /// 404 unknown project, 400 bad kid or key, 409 the project has
    /// [`MAX_KEYS_PER_PROJECT`] keys and `kid` is a new one, 413 key too large.
    pub fn put_key(&self, project: &str, kid: &str, spec: KeySpec) -> Result<(), AdminError> {
        if !valid_kid(kid) {
            return Err(AdminError::BadRequest(
                "kid must be 1 to 128 of A-Z a-z 0-9 . _ -".into(),
            ));
        }
        let mut inner = self.lock();
        let Some(nr_keys) = self.hub.registry.load().project(project).map(|p| {
            let replaces = p.keys.iter().any(|k| k.kid.as_deref() == Some(kid));
            p.keys.len() + usize::from(!replaces)
        }) else {
            return Err(AdminError::UnknownProject(project.into()));
        };
        if nr_keys > MAX_KEYS_PER_PROJECT {
            return Err(AdminError::Conflict(format!(
                "project `{project}` has {} keys, the most a project may have; \
                 delete one before adding `{kid}`",
                nr_keys - 1
            )));
        }
        let mut state = inner.state.clone();
        let entry = state.projects.entry(project.into()).or_default();
        entry.keys.insert(kid.into(), spec);
        entry.revoked.remove(kid);
        let config = inner.config.clone();
        self.commit(&mut inner, config, state, Some(project))?;
        info!(project, kid, "key registered");
        Ok(())
    }

    /// `DELETE /api/v1/projects/{project}/keys/{kid}`: revokes a key for new handshakes.
    /// Returns the project's index, for the caller to tell the shards to close the key's
    /// connections if asked ([`ShardMsg::RevokeKey`]); this never waits on a shard.
    ///
    /// # Errors
    /// 404 unknown project or key.
    pub fn delete_key(&self, project: &str, kid: &str) -> Result<u32, AdminError> {
        let mut inner = self.lock();
        let registry = self.hub.registry.load_full();
        let Some(p) = registry.project(project) else {
            return Err(AdminError::UnknownProject(project.into()));
        };
        if !p.keys.iter().any(|k| k.kid.as_deref() == Some(kid)) {
            return Err(AdminError::UnknownKey {
                project: project.into(),
                kid: kid.into(),
            });
        }
        let idx = p.idx;
        let mut state = inner.state.clone();
        let entry = state.projects.entry(project.into()).or_default();
        entry.keys.remove(kid);
        entry.revoked.insert(kid.into());
        let config = inner.config.clone();
        self.commit(&mut inner, config, state, Some(project))?;
        info!(project, kid, "key revoked");
        Ok(idx)
    }

    /// The index of `project` when `kid` is one of its revoked keys (revoked, not registered
    /// again): a revoke may be retried to send its disconnect orders again.
    pub fn revoked_key(&self, project: &str, kid: &str) -> Option<u32> {
        let inner = self.lock();
        let revoked = inner
            .state
            .projects
            .get(project)
            .is_some_and(|p| p.revoked.contains(kid));
        let registry = self.hub.registry.load();
        let p = registry.project(project)?;
        let registered = p.keys.iter().any(|k| k.kid.as_deref() == Some(kid));
        (revoked && !registered).then_some(p.idx)
    }

    /// SIGHUP: re-reads the config file and applies what a running node can change: projects
    /// and keys, the admin key and the IP access lists. Every other setting needs a restart:
    /// each such key that differs from the running value is logged by name and the running
    /// value stays. A bad file is refused with a log line and everything stays as it was.
    ///
    /// # Errors
    /// Why the file was refused (already logged), to report to the service manager.
    pub fn reload(&self) -> Result<(), String> {
        let Some(path) = &self.config_path else {
            info!("SIGHUP: running on the embedded default; nothing to reload");
            return Ok(());
        };
        let mut inner = self.lock();
        let running = &inner.config;
        let config = Config::load(path).and_then(|mut c| {
            // Command-line overrides of the running process still apply.
            self.overrides.apply(&mut c);
            c.validate().map(|()| c)
        });
        let mut config = match config {
            Ok(c) => c,
            Err(e) => {
                let e = e.to_string();
                warn!("SIGHUP: reload refused, old settings stay: {e}");
                return Err(e);
            }
        };
        for key in restart_only_changes(running, &config) {
            warn!(%key, "SIGHUP: {key} changed; needs a restart to take effect");
        }
        keep_restart_only_settings(running, &mut config);
        let state = inner.state.clone();
        match self.commit(&mut inner, config, state, None) {
            Ok(()) => {
                info!(file = %path.display(), "SIGHUP: projects and keys reloaded");
                Ok(())
            }
            Err(e) => {
                let e = e.to_string();
                warn!("SIGHUP: reload refused, old settings stay: {e}");
                Err(e)
            }
        }
    }

    /// Where the state lives.
    pub fn state_dir(&self) -> &std::path::Path {
        self.store.dir()
    }
}
