//! `POST /tokens/zone` and `POST /tokens/dataplane`: tokens as text (`kumactl generate ...`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{Peer, error, internal, read_body, require_admin};
use crate::context::Cp;
use crate::model::{Cause, ResourceType};
use crate::tokens::{DEFAULT_VALID_FOR, DataplaneClaims, TokenError};

fn token_error(e: TokenError) -> Response {
    match e {
        TokenError::Invalid(msg) => {
            let (field, message) = msg.split_once(": ").unwrap_or(("", msg.as_str()));
            error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Could not issue a token",
                "Invalid request",
                &[Cause::new(field, message)],
            )
        }
        TokenError::NotIssuer(msg) => error(StatusCode::BAD_REQUEST, "Could not issue a token", &msg, &[]),
        other => internal(other),
    }
}

fn parse_valid_for(v: &str) -> Result<std::time::Duration, Response> {
    if v.is_empty() {
        return Ok(DEFAULT_VALID_FOR);
    }
    crate::model::parse_duration(v).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Could not issue a token",
            "Invalid request",
            &[Cause::new("validFor", e)],
        )
    })
}

fn token_text(token: String) -> Response {
    let mut r = (StatusCode::OK, token).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ZoneTokenRequest {
    zone: String,
    scope: Vec<String>,
    valid_for: String,
}

pub async fn zone_token(State(cp): State<Arc<Cp>>, peer: Option<Extension<Peer>>, req: Request) -> Response {
    if let Err(r) = require_admin(peer) {
        return r;
    }
    let text = match read_body(req).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let r: ZoneTokenRequest = match serde_json::from_str(&text) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "Could not issue a token", &format!("invalid JSON: {e}"), &[]),
    };
    let valid_for = match parse_valid_for(&r.valid_for) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    match cp.tokens.issue_zone(&r.zone, &r.scope, valid_for).await {
        Ok(t) => token_text(t),
        Err(e) => token_error(e),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct DataplaneTokenRequest {
    name: String,
    mesh: String,
    tags: BTreeMap<String, Vec<String>>,
    #[serde(rename = "type")]
    proxy_type: String,
    workload: String,
    valid_for: String,
}

pub async fn dataplane_token(State(cp): State<Arc<Cp>>, peer: Option<Extension<Peer>>, req: Request) -> Response {
    if let Err(r) = require_admin(peer) {
        return r;
    }
    let text = match read_body(req).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let r: DataplaneTokenRequest = match serde_json::from_str(&text) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "Could not issue a token", &format!("invalid JSON: {e}"), &[]),
    };
    let valid_for = match parse_valid_for(&r.valid_for) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let mesh = if r.mesh.is_empty() { "default".to_string() } else { r.mesh };
    match cp.store.get(ResourceType::Mesh, "", &mesh).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Could not issue a token",
                "Invalid request",
                &[Cause::new("mesh", format!("mesh of name {mesh} is not found"))],
            );
        }
        Err(e) => return internal(e),
    }
    let claims = DataplaneClaims {
        name: r.name,
        mesh,
        tags: r.tags,
        proxy_type: r.proxy_type,
        workload: r.workload,
        ..Default::default()
    };
    match cp.tokens.issue_dataplane(claims, valid_for).await {
        Ok(t) => token_text(t),
        Err(e) => token_error(e),
    }
}
