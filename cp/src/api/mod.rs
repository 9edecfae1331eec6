//! REST API (port 5681) in Kuma's Universal shapes, the same on global and zones.
//!
//! Routes come from the resource descriptors: `/<plural>[/{name}]` for global-scoped
//! types, `/meshes/{mesh}/<plural>[/{name}]` (and `/<plural>` across meshes) for
//! mesh-scoped ones, `_overview` (and the legacy `+insights`) for types with insights.
//! What a mode may not write answers 405 with Kuma's sentence.
//!
//! Reads are open; writes and token issuing are accepted only from loopback peers (Kuma
//! treats localhost as admin and refuses anonymous writes).

// Helpers return `Result<_, Response>` so handlers can `?`-style early-return an HTTP error;
// the response is built once per request, its size does not matter.
#![allow(clippy::result_large_err)]

mod overviews;
mod resources;
mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Extension, Router};
use serde_json::{Value, json};

use crate::context::Cp;
use crate::model::{Cause, ResourceType};
use crate::store::StoreError;

const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone, Copy)]
pub struct Peer(pub SocketAddr);

pub fn with_peer(router: Router, peer: SocketAddr) -> Router {
    router.layer(Extension(Peer(peer)))
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut r = (status, serde_json::to_string_pretty(v).unwrap_or_default()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Kuma's error body (`kumahq/kuma:pkg/api-server/...`): RFC 7807-like plus legacy `details`/`causes`.
pub fn error(status: StatusCode, title: &str, detail: &str, causes: &[Cause]) -> Response {
    let body = json!({
        "type": "/std-errors",
        "status": status.as_u16(),
        "title": title,
        "detail": detail,
        "details": detail,
        "causes": causes,
        "invalid_parameters": causes.iter().map(|c| json!({"field": c.field, "reason": c.message})).collect::<Vec<_>>(),
    });
    json_response(status, &body)
}

fn not_found(rtype: ResourceType, mesh: &str, name: &str) -> Response {
    let what = if rtype.is_mesh_scoped() {
        format!("{} {name:?} not found in mesh {mesh:?}", rtype.name())
    } else {
        format!("{} {name:?} not found", rtype.name())
    };
    error(StatusCode::NOT_FOUND, "Could not retrieve a resource", &what, &[])
}

fn internal(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error", &e.to_string(), &[])
}

/// A failed store write as Kuma answers it: a version conflict is 409 `Conflict` with
/// Kuma's detail, a database that cannot be reached 503, anything else 500.
fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::Conflict { rtype, mesh, name, .. } => error(
            StatusCode::CONFLICT,
            "Conflict",
            &format!("resource conflict: type={rtype:?} name={name:?} mesh={mesh:?}"),
            &[],
        ),
        StoreError::Unavailable(msg) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service unavailable",
            &format!(
                "{msg}; nothing was written. The control plane keeps serving its proxies from memory and accepts \
                 changes again once the database is back"
            ),
            &[],
        ),
        e => internal(e),
    }
}

fn require_admin(peer: Option<Extension<Peer>>) -> Result<(), Response> {
    match peer {
        Some(Extension(Peer(addr))) if !addr.ip().is_loopback() => Err(error(
            StatusCode::FORBIDDEN,
            "Access Denied",
            "writes and token requests are only accepted from localhost; run ctl on the control plane host",
            &[],
        )),
        _ => Ok(()),
    }
}

async fn read_body(req: Request) -> Result<String, Response> {
    let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY).await.map_err(|_| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Could not process a resource",
            "the request body is larger than 1 MiB",
            &[],
        )
    })?;
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        error(StatusCode::BAD_REQUEST, "Could not process a resource", "the request body is not UTF-8", &[])
    })
}

pub fn router(cp: Arc<Cp>) -> Router {
    let mut r = Router::new()
        .route("/", get(index))
        .route("/config", get(config))
        .route("/policies", get(policies))
        .route("/metrics", get(metrics))
        .route("/meshes/{mesh}/service-insights", get(overviews::service_insights))
        .route("/meshes/{mesh}/service-insights/{svc}", get(overviews::service_insight))
        .route("/tokens/zone", post(tokens::zone_token))
        .route("/tokens/dataplane", post(tokens::dataplane_token))
        .route("/tokens", post(tokens::dataplane_token));
    for d in ResourceType::ALL.iter().map(|t| t.descriptor()) {
        if d.rtype == ResourceType::ServiceInsight {
            continue; // served expanded per service, above
        }
        let t = d.rtype;
        for plural in std::iter::once(d.plural).chain(d.aliases.iter().copied()) {
            if t.is_mesh_scoped() {
                r = r
                    .route(&format!("/{plural}"), get(move |s, q| resources::list(s, t, None, q)))
                    .route(
                        &format!("/meshes/{{mesh}}/{plural}"),
                        get(move |s, Path(m): Path<String>, q| resources::list(s, t, Some(m), q)),
                    )
                    .route(&format!("/meshes/{{mesh}}/{plural}/{{name}}"), one_mesh_scoped(t));
            } else {
                r = r
                    .route(&format!("/{plural}"), get(move |s, q| resources::list(s, t, None, q)))
                    .route(&format!("/{plural}/{{name}}"), one_global_scoped(t));
            }
        }
    }
    overviews::routes(r).merge(crate::gui::router()).fallback(crate::dpserver::not_found).with_state(cp)
}

fn one_global_scoped(t: ResourceType) -> MethodRouter<Arc<Cp>> {
    get(move |s, Path(n): Path<String>| resources::get_one(s, t, String::new(), n))
        .put(move |s, p, Path(n): Path<String>, r| resources::put(s, p, t, String::new(), n, r))
        .delete(move |s, p, Path(n): Path<String>| resources::delete(s, p, t, String::new(), n))
}

fn one_mesh_scoped(t: ResourceType) -> MethodRouter<Arc<Cp>> {
    get(move |s, Path((m, n)): Path<(String, String)>| resources::get_one(s, t, m, n))
        .put(move |s, p, Path((m, n)): Path<(String, String)>, r| resources::put(s, p, t, m, n, r))
        .delete(move |s, p, Path((m, n)): Path<(String, String)>| resources::delete(s, p, t, m, n))
}

/// Kuma's `GET /policies`: the policy types, with the REST path of each.
async fn policies() -> Response {
    let list: Vec<Value> = ResourceType::ALL
        .iter()
        .map(|t| t.descriptor())
        .filter(|d| d.policy)
        .map(|d| {
            json!({
                "name": d.name,
                "path": d.plural,
                "readOnly": d.read_only,
                "isTargetRefBased": d.shape == crate::model::Shape::Nested,
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "policies": list }))
}

async fn index(State(cp): State<Arc<Cp>>) -> Response {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    json_response(
        StatusCode::OK,
        &json!({
            "hostname": hostname,
            "product": "mesh-cp",
            "version": env!("CARGO_PKG_VERSION"),
            "basedOnKuma": crate::kds::KUMA_VERSION,
            "instanceId": cp.instance_id,
            "clusterId": "",
            "mode": cp.mode_name(),
            "zone": if cp.cfg.is_global() { Value::Null } else { cp.cfg.zone_name.clone().into() },
        }),
    )
}

async fn config(State(cp): State<Arc<Cp>>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "mode": cp.mode_name(),
            "multizone": {
                "zone": {"name": cp.cfg.zone_name, "globalAddress": cp.cfg.global_address},
                "global": {"kds": {"grpcPort": cp.cfg.kds_port}},
            },
            "store": {"type": cp.store.store_type()},
            "dpServer": {"port": cp.dp_port.load(std::sync::atomic::Ordering::Relaxed)},
        }),
    )
}

/// Prometheus text: the KDS counters, and Kuma's `leader` gauge.
async fn metrics(State(cp): State<Arc<Cp>>) -> Response {
    let mut text = cp.kds_metrics.render();
    text.push_str("# HELP leader 1 indicates that this instance is leader\n# TYPE leader gauge\n");
    text.push_str(if cp.leader.is_leader() { "leader 1\n" } else { "leader 0\n" });
    let mut r = (StatusCode::OK, text).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}
