//! REST API (port 5681) in Kuma's Universal shapes.
//!
//! Reads are open; writes and token issuing are accepted only from loopback peers (Kuma
//! treats localhost as admin and refuses anonymous writes).

// Helpers return `Result<_, Response>` so handlers can `?`-style early-return an HTTP error;
// the response is built once per request, its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::context::Cp;
use crate::model::{Cause, DataplaneSpec, Resource, ResourceType, SERVICE_TAG, parse_document, validate};
use crate::tokens::{DEFAULT_VALID_FOR, DataplaneClaims, TokenError};

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

pub fn router(cp: Arc<Cp>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/config", get(config))
        .route("/meshes", get(|s, q| list(s, ResourceType::Mesh, None, q)))
        .route(
            "/meshes/{name}",
            get(|s, Path(n): Path<String>| get_one(s, ResourceType::Mesh, String::new(), n))
                .put(|s, p, Path(n): Path<String>, r| put(s, p, ResourceType::Mesh, String::new(), n, r))
                .delete(|s, p, Path(n): Path<String>| delete(s, p, ResourceType::Mesh, String::new(), n)),
        )
        .route("/dataplanes", get(|s, q| list(s, ResourceType::Dataplane, None, q)))
        .route(
            "/meshes/{mesh}/dataplanes",
            get(|s, Path(m): Path<String>, q| list(s, ResourceType::Dataplane, Some(m), q)),
        )
        .route(
            "/meshes/{mesh}/dataplanes/{name}",
            get(|s, Path((m, n)): Path<(String, String)>| get_one(s, ResourceType::Dataplane, m, n))
                .put(|s, p, Path((m, n)): Path<(String, String)>, r| put(s, p, ResourceType::Dataplane, m, n, r))
                .delete(|s, p, Path((m, n)): Path<(String, String)>| delete(s, p, ResourceType::Dataplane, m, n)),
        )
        .route("/meshes/{mesh}/service-insights", get(service_insights))
        .route("/meshes/{mesh}/service-insights/{svc}", get(service_insight))
        .route("/zoneingresses", get(|s, q| list(s, ResourceType::ZoneIngress, None, q)))
        .route(
            "/zoneingresses/{name}",
            get(|s, Path(n): Path<String>| get_one(s, ResourceType::ZoneIngress, String::new(), n))
                .put(|s, p, Path(n): Path<String>, r| put(s, p, ResourceType::ZoneIngress, String::new(), n, r))
                .delete(|s, p, Path(n): Path<String>| delete(s, p, ResourceType::ZoneIngress, String::new(), n)),
        )
        .route("/zoneegresses", get(|s, q| list(s, ResourceType::ZoneEgress, None, q)))
        .route(
            "/zoneegresses/{name}",
            get(|s, Path(n): Path<String>| get_one(s, ResourceType::ZoneEgress, String::new(), n))
                .put(|s, p, Path(n): Path<String>, r| put(s, p, ResourceType::ZoneEgress, String::new(), n, r))
                .delete(|s, p, Path(n): Path<String>| delete(s, p, ResourceType::ZoneEgress, String::new(), n)),
        )
        .route("/zones", get(|s, q| list(s, ResourceType::Zone, None, q)))
        .route(
            "/zones/{name}",
            get(|s, Path(n): Path<String>| get_one(s, ResourceType::Zone, String::new(), n))
                .put(|s, p, Path(n): Path<String>, r| put(s, p, ResourceType::Zone, String::new(), n, r))
                .delete(|s, p, Path(n): Path<String>| delete(s, p, ResourceType::Zone, String::new(), n)),
        )
        .route("/tokens/zone", post(zone_token))
        .route("/tokens/dataplane", post(dataplane_token))
        .route("/tokens", post(dataplane_token))
        .fallback(crate::dpserver::not_found)
        .with_state(cp)
}

async fn index(State(cp): State<Arc<Cp>>) -> Response {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    json_response(
        StatusCode::OK,
        &json!({
            "hostname": hostname,
            "product": "mesh-cp",
            "version": env!("CARGO_PKG_VERSION"),
            "basedOnKuma": "2.14.3",
            "instanceId": hostname,
            "clusterId": "",
            "mode": if cp.cfg.is_global() { "global" } else { "zone" },
            "zone": cp.cfg.zone_name,
        }),
    )
}

async fn config(State(cp): State<Arc<Cp>>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "mode": if cp.cfg.is_global() { "global" } else { "zone" },
            "multizone": {"zone": {"name": cp.cfg.zone_name, "globalAddress": cp.cfg.global_address}},
            "store": {"type": "memory"},
            "dpServer": {"port": cp.dp_port.load(std::sync::atomic::Ordering::Relaxed)},
        }),
    )
}

#[derive(Deserialize, Default)]
struct ListQuery {
    size: Option<usize>,
    offset: Option<usize>,
    name: Option<String>,
}

async fn list(
    State(cp): State<Arc<Cp>>,
    rtype: ResourceType,
    mesh: Option<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    let items = match cp.store.list(rtype, mesh.as_deref()).await {
        Ok(i) => i,
        Err(e) => return internal(e),
    };
    let items: Vec<Resource> =
        items.into_iter().filter(|r| q.name.as_deref().is_none_or(|n| r.name.contains(n))).collect();
    let total = items.len();
    let offset = q.offset.unwrap_or(0).min(total);
    let size = q.size.unwrap_or(100).clamp(1, 1000);
    let page: Vec<Value> = items.iter().skip(offset).take(size).map(Resource::to_json).collect();
    let next = if offset + size < total {
        let base = match (&mesh, rtype.is_mesh_scoped()) {
            (Some(m), true) => format!("/meshes/{m}/{}", rtype.plural()),
            _ => format!("/{}", rtype.plural()),
        };
        Value::String(format!("{base}?offset={}&size={size}", offset + size))
    } else {
        Value::Null
    };
    json_response(StatusCode::OK, &json!({"total": total, "items": page, "next": next}))
}

async fn get_one(State(cp): State<Arc<Cp>>, rtype: ResourceType, mesh: String, name: String) -> Response {
    match cp.store.get(rtype, &mesh, &name).await {
        Ok(Some(r)) => json_response(StatusCode::OK, &r.to_json()),
        Ok(None) => not_found(rtype, &mesh, &name),
        Err(e) => internal(e),
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

async fn put(
    State(cp): State<Arc<Cp>>,
    peer: Option<Extension<Peer>>,
    rtype: ResourceType,
    mesh: String,
    name: String,
    req: Request,
) -> Response {
    if let Err(r) = require_admin(peer) {
        return r;
    }
    let text = match read_body(req).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let doc = match parse_document(&text) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, "Could not process a resource", &e.to_string(), &[]),
    };
    let mut r = match Resource::from_json(&doc) {
        Ok(r) => r,
        Err(crate::model::ResourceError::Invalid(c)) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Could not process a resource",
                "Resource is not valid",
                &c,
            );
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, "Could not process a resource", &e.to_string(), &[]),
    };
    let mut causes = Vec::new();
    if r.rtype != rtype {
        causes.push(Cause::new("type", format!("type from the URL ({}) has to be the same as in body", rtype.name())));
    }
    if r.name != name {
        causes.push(Cause::new("name", "name from the URL has to be the same as in body"));
    }
    if rtype.is_mesh_scoped() {
        if doc.get("mesh").is_none() {
            r.mesh = mesh.clone();
        } else if r.mesh != mesh {
            causes.push(Cause::new("mesh", "mesh from the URL has to be the same as in body"));
        }
    }
    if !causes.is_empty() {
        return error(StatusCode::BAD_REQUEST, "Could not process a resource", "Resource is not valid", &causes);
    }
    if let Err(c) = validate(&r) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Could not process a resource", "Resource is not valid", &c);
    }
    if rtype == ResourceType::Dataplane {
        if cp.cfg.is_global() {
            return error(
                StatusCode::BAD_REQUEST,
                "Could not process a resource",
                "On global control plane you can not modify dataplane resources; apply them on a zone control plane",
                &[],
            );
        }
        match cp.store.get(ResourceType::Mesh, "", &r.mesh).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Could not process a resource",
                    "Mesh is not found",
                    &[Cause::new("mesh", format!("mesh of name {} is not found", r.mesh))],
                );
            }
            Err(e) => return internal(e),
        }
    }
    if matches!(rtype, ResourceType::ZoneIngress | ResourceType::ZoneEgress)
        && r.spec.get("zone").and_then(Value::as_str).is_none_or(str::is_empty)
    {
        r.spec.insert("zone".into(), cp.cfg.zone_name.clone().into());
    }
    let existed = match cp.store.get(rtype, &r.mesh, &r.name).await {
        Ok(e) => e,
        Err(e) => return internal(e),
    };
    let local_zone = r.spec.get("zone").and_then(Value::as_str) == Some(cp.cfg.zone_name.as_str());
    if rtype == ResourceType::ZoneIngress
        && local_zone
        && let Some(old) = &existed
        && let Some(av) = old.spec.get("availableServices")
    {
        // availableServices of this zone's ingresses is computed by the control plane;
        // other zones' ingresses (normally synced from global) keep what was applied.
        r.spec.insert("availableServices".into(), av.clone());
    }
    match cp.store.upsert(r, None).await {
        Ok(_) => {
            let status = if existed.is_some() { StatusCode::OK } else { StatusCode::CREATED };
            json_response(status, &json!({"warnings": []}))
        }
        Err(e) => internal(e),
    }
}

async fn delete(
    State(cp): State<Arc<Cp>>,
    peer: Option<Extension<Peer>>,
    rtype: ResourceType,
    mesh: String,
    name: String,
) -> Response {
    if let Err(r) = require_admin(peer) {
        return r;
    }
    match cp.store.delete(rtype, &mesh, &name).await {
        Ok(true) => json_response(StatusCode::OK, &json!({})),
        Ok(false) => not_found(rtype, &mesh, &name),
        Err(e) => internal(e),
    }
}

/// Service overview computed from the zone's Dataplanes (`kumactl inspect services`).
async fn compute_insights(cp: &Cp, mesh: &str) -> Result<BTreeMap<String, (u32, u32)>, Response> {
    let dps = cp.store.list(ResourceType::Dataplane, Some(mesh)).await.map_err(internal)?;
    let mut out: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for dp in dps {
        let online = cp.is_online(&dp.key());
        let Ok(spec) = dp.typed::<DataplaneSpec>() else { continue };
        for inb in spec.networking.map(|n| n.inbound).unwrap_or_default() {
            let Some(svc) = inb.tags.get(SERVICE_TAG) else { continue };
            let e = out.entry(svc.clone()).or_default();
            e.0 += 1;
            if online && inb.is_healthy() {
                e.1 += 1;
            }
        }
    }
    Ok(out)
}

fn insight_json(mesh: &str, name: &str, total: u32, online: u32) -> Value {
    let status = if online == 0 {
        "offline"
    } else if online == total {
        "online"
    } else {
        "partially_degraded"
    };
    json!({"type": "ServiceOverview", "mesh": mesh, "name": name, "status": status,
           "dataplanes": {"total": total, "online": online, "offline": total - online}})
}

async fn service_insights(State(cp): State<Arc<Cp>>, Path(mesh): Path<String>) -> Response {
    match compute_insights(&cp, &mesh).await {
        Ok(m) => {
            let items: Vec<Value> = m.iter().map(|(n, (t, o))| insight_json(&mesh, n, *t, *o)).collect();
            json_response(StatusCode::OK, &json!({"total": items.len(), "items": items, "next": null}))
        }
        Err(r) => r,
    }
}

async fn service_insight(State(cp): State<Arc<Cp>>, Path((mesh, svc)): Path<(String, String)>) -> Response {
    match compute_insights(&cp, &mesh).await {
        Ok(m) => match m.get(&svc) {
            Some((t, o)) => json_response(StatusCode::OK, &insight_json(&mesh, &svc, *t, *o)),
            None => error(StatusCode::NOT_FOUND, "Could not retrieve a resource", "Not found", &[]),
        },
        Err(r) => r,
    }
}

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

async fn zone_token(State(cp): State<Arc<Cp>>, peer: Option<Extension<Peer>>, req: Request) -> Response {
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

async fn dataplane_token(State(cp): State<Arc<Cp>>, peer: Option<Extension<Peer>>, req: Request) -> Response {
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
