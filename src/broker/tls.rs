//! TLS to the engine (`rediss://`): turns `[engine]`'s TLS keys into the address the Redis
//! client connects with. The handshake itself is the `redis` crate's, on rustls (no system
//! OpenSSL); certificates are read here, once, at load, so a missing or broken file is a
//! configuration error naming its key rather than a failure at the first connection.

use std::path::Path;

use redis::{ClientTlsConfig, ConnectionInfo, IntoConnectionInfo, TlsCertificates};

/// `[engine]`'s address and TLS keys (`engine.url`, `engine.tls_*`).
pub struct TlsSettings<'a> {
    /// `engine.url`, a `rediss://` address.
    pub url: &'a str,
    /// `engine.tls_ca_file`.
    pub tls_ca_file: Option<&'a Path>,
    /// `engine.tls_cert_file`.
    pub tls_cert_file: Option<&'a Path>,
    /// `engine.tls_key_file`.
    pub tls_key_file: Option<&'a Path>,
    /// `engine.tls_insecure`.
    pub tls_insecure: bool,
}

/// The address of a `rediss://` engine with the section's CA, client certificate and
/// `tls_insecure` applied.
///
/// # Errors
/// The key at fault and why (the URL itself is never quoted: it may hold a password).
pub fn address(e: &TlsSettings<'_>) -> Result<ConnectionInfo, (&'static str, String)> {
    if e.tls_insecure && e.tls_ca_file.is_some() {
        return Err((
            "engine.tls_insecure",
            "verifies nothing, so `engine.tls_ca_file` would be ignored; set one of them".into(),
        ));
    }
    if e.tls_cert_file.is_some() != e.tls_key_file.is_some() {
        let key = if e.tls_cert_file.is_some() {
            "engine.tls_key_file"
        } else {
            "engine.tls_cert_file"
        };
        return Err((
            key,
            "a client certificate needs both `tls_cert_file` and `tls_key_file`".into(),
        ));
    }
    if e.url.contains('#') {
        return Err((
            "engine.url",
            "no `#` fragment: use `engine.tls_insecure` to skip verification".into(),
        ));
    }
    // The client's own spelling of an unverified connection.
    let url = if e.tls_insecure {
        format!("{}#insecure", e.url)
    } else {
        e.url.to_owned()
    };
    let info = url.as_str().into_connection_info().map_err(|err| {
        (
            "engine.url",
            format!(
                "not a usable Redis address ({}: {}); expected \
                 rediss://[USER[:PASSWORD]@]HOST[:PORT][/DB]",
                err.category(),
                err.detail().unwrap_or("no detail")
            ),
        )
    })?;
    let root_cert = read(e.tls_ca_file, "engine.tls_ca_file")?;
    let client_cert = read(e.tls_cert_file, "engine.tls_cert_file")?;
    let client_key = read(e.tls_key_file, "engine.tls_key_file")?;
    if root_cert.is_none() && client_cert.is_none() {
        return Ok(info);
    }
    let client_tls = client_cert
        .zip(client_key)
        .map(|(client_cert, client_key)| ClientTlsConfig {
            client_cert,
            client_key,
        });
    let key = if root_cert.is_some() {
        "engine.tls_ca_file"
    } else {
        "engine.tls_cert_file"
    };
    redis::Client::build_with_tls(
        info,
        TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map(|c| c.get_connection_info().clone())
    .map_err(|err| (key, format!("not usable PEM: {err}")))
}

/// A PEM file's bytes, `None` without a path.
fn read(path: Option<&Path>, key: &'static str) -> Result<Option<Vec<u8>>, (&'static str, String)> {
    path.map(|p| {
        std::fs::read(p).map_err(|err| (key, format!("cannot read {}: {err}", p.display())))
    })
    .transpose()
}
