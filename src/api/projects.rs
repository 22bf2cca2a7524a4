//! Project and key management endpoints: `POST /api/v1/projects`,
//! `PUT|DELETE /api/v1/projects/{project}/keys/{kid}`. The work is done by
//! [`crate::admin::Admin`]; this maps HTTP to it and its errors to statuses.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::{ApiError, ApiSettings, Caller, body, json, require_admin};
use crate::admin::{Admin, AdminError};
use crate::auth::keys::{KeySpec, MAX_KEY_BYTES, spec_from_jwk};
use crate::config::ProjectConfig;
use crate::hub::Hub;

fn map(e: AdminError) -> ApiError {
    let msg = e.to_string();
    match e {
        AdminError::BadRequest(_) => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", msg),
        AdminError::UnknownProject(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_project", msg)
        }
        AdminError::UnknownKey { .. } => ApiError::new(StatusCode::NOT_FOUND, "not_found", msg),
        AdminError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", msg),
        AdminError::TooLarge(_) => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", msg)
        }
        AdminError::Store(_) | AdminError::Busy(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg)
        }
    }
}

fn no_content() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// The caller may manage `project` (admin, or that project's own key).
fn authorize(hub: &Hub, who: Caller, project: &str) -> Result<(), ApiError> {
    match who {
        Caller::Admin => Ok(()),
        Caller::Project(idx) => {
            let registry = hub.registry.load();
            if registry.project(project).is_some_and(|p| p.idx == idx) {
                Ok(())
            } else {
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!("this API key does not act on project `{project}`"),
                ))
            }
        }
    }
}

pub(super) async fn create(
    admin: &Admin,
    settings: &ApiSettings,
    who: Caller,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    require_admin(who, "creating a project")?;
    let bytes = body(req, settings.max_body_bytes, settings.body_read_timeout).await?;
    let p: ProjectConfig = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid project: {e}")))?;
    let id = p.id.clone();
    admin.create_project(p).map_err(map)?;
    Ok(json(StatusCode::CREATED, &serde_json::json!({ "id": id })))
}

pub(super) async fn put_key(
    hub: &Hub,
    admin: &Admin,
    settings: &ApiSettings,
    who: Caller,
    project: &str,
    kid: &str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    authorize_or_unknown(hub, who, project)?;
    let bytes = body(req, MAX_KEY_BYTES, settings.body_read_timeout).await?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid key body: {e}")))?;
    let is_jwk = value.get("kty").is_some();
    let spec = if is_jwk {
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(value)
            .map_err(|e| ApiError::bad_request(format!("invalid JWK: {e}")))?;
        if jwk.common.key_id.as_deref().is_some_and(|k| k != kid) {
            return Err(ApiError::bad_request(
                "the JWK's kid differs from the kid in the path",
            ));
        }
        spec_from_jwk(jwk).map_err(|e| ApiError::bad_request(e.to_string()))?
    } else {
        // `{"alg", "pem"}`, `{"alg", "secret"}` or `{"alg", "jwk": {...}}`.
        serde_json::from_value::<KeySpec>(value).map_err(|e| {
            ApiError::bad_request(format!(
                "a key is {{\"alg\",\"pem\"}}, {{\"alg\",\"secret\"}}, {{\"alg\",\"jwk\"}} or a JWK: {e}"
            ))
        })?
    };
    admin.put_key(project, kid, spec).map_err(map)?;
    Ok(no_content())
}

/// Authorizes, but answers 404 for an unknown project to the admin (a project key gets 403
/// for any project but its own, known or not).
fn authorize_or_unknown(hub: &Hub, who: Caller, project: &str) -> Result<(), ApiError> {
    authorize(hub, who, project)?;
    if hub.registry.load().project(project).is_none() {
        return Err(map(AdminError::UnknownProject(project.into())));
    }
    Ok(())
}

pub(super) fn delete_key(
    hub: &Hub,
    admin: &Admin,
    who: Caller,
    project: &str,
    kid: &str,
    req: &Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    authorize_or_unknown(hub, who, project)?;
    let disconnect = req
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .any(|(k, v)| k == "disconnect" && matches!(&*v, "true" | "1"))
        })
        .unwrap_or(false);
    admin.delete_key(project, kid, disconnect).map_err(map)?;
    Ok(no_content())
}
