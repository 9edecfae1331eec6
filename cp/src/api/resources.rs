//! List, get, create-or-update and delete of any resource type, with what each mode may
//! write (Kuma's `resource_endpoints.go`).

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Peer, error, internal, json_response, not_found, read_body, require_admin, store_error};
use crate::context::Cp;
use crate::model::labels::{self, ORIGIN, ORIGIN_GLOBAL, ORIGIN_ZONE, ZONE};
use crate::model::{Cause, Resource, ResourceError, ResourceType, parse_document, validate};

/// Kuma's sentences for writes a mode refuses (`globalReadOnlyMessage`, `zoneReadOnlyMessage`).
const GLOBAL_READ_ONLY: &str = "On global control plane you can not modify dataplane resources with 'kumactl apply' \
    or via the HTTP API. You can still use 'kumactl' or the HTTP API to modify them on the zone control plane.";
const ZONE_READ_ONLY: &str = "On zone control plane you can only modify zone resources with 'kumactl apply' or via \
    the HTTP API. You can still use 'kumactl' or the HTTP API to modify the rest of the resource on the global \
    control plane.";
/// `zone_validator.go`: a connected zone cannot be deleted.
pub const ZONE_STILL_CONNECTED: &str = "unable to delete Zone, Zone CP is still connected, please shut it down first";

#[derive(Deserialize, Default)]
pub(super) struct ListQuery {
    size: Option<usize>,
    offset: Option<usize>,
    name: Option<String>,
}

/// A page of `items` in Kuma's list shape (`{total, items, next}`).
pub(super) fn page(items: Vec<Value>, q: &ListQuery, base: &str) -> Response {
    let items: Vec<Value> = items
        .into_iter()
        .filter(|v| q.name.as_deref().is_none_or(|n| v["name"].as_str().is_some_and(|name| name.contains(n))))
        .collect();
    let total = items.len();
    let offset = q.offset.unwrap_or(0).min(total);
    let size = q.size.unwrap_or(100).clamp(1, 1000);
    let page: Vec<Value> = items.into_iter().skip(offset).take(size).collect();
    let next = if offset + size < total {
        Value::String(format!("{base}?offset={}&size={size}", offset + size))
    } else {
        Value::Null
    };
    json_response(StatusCode::OK, &json!({"total": total, "items": page, "next": next}))
}

pub(super) fn base_path(rtype: ResourceType, mesh: Option<&str>) -> String {
    match mesh {
        Some(m) if rtype.is_mesh_scoped() => format!("/meshes/{m}/{}", rtype.plural()),
        _ => format!("/{}", rtype.plural()),
    }
}

pub(super) async fn list(
    State(cp): State<Arc<Cp>>,
    rtype: ResourceType,
    mesh: Option<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    match cp.store.list(rtype, mesh.as_deref()).await {
        Ok(items) => page(items.iter().map(Resource::to_json).collect(), &q, &base_path(rtype, mesh.as_deref())),
        Err(e) => internal(e),
    }
}

pub(super) async fn get_one(State(cp): State<Arc<Cp>>, rtype: ResourceType, mesh: String, name: String) -> Response {
    match cp.store.get(rtype, &mesh, &name).await {
        Ok(Some(r)) => {
            let mut resp = json_response(StatusCode::OK, &r.to_json());
            // The store version, for a conditional PUT (`If-Match`).
            if let Ok(v) = axum::http::HeaderValue::from_str(&format!("\"{}\"", r.version)) {
                resp.headers_mut().insert(axum::http::header::ETAG, v);
            }
            resp
        }
        Ok(None) => not_found(rtype, &mesh, &name),
        Err(e) => internal(e),
    }
}

/// 405 with Kuma's sentence when this mode may not write `rtype`.
fn writable(cp: &Cp, rtype: ResourceType) -> Result<(), Response> {
    let d = rtype.descriptor();
    if d.read_only {
        let msg = format!("a {} is computed by the control plane and cannot be written", d.name);
        return Err(error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", &msg, &[]));
    }
    if d.writable(cp.cfg.is_global(), cp.cfg.is_federated_zone()) {
        return Ok(());
    }
    let msg = if cp.cfg.is_global() { GLOBAL_READ_ONLY } else { ZONE_READ_ONLY };
    Err(error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", msg, &[]))
}

/// Kuma's origin-label rules for writes (`validateOriginForWrite`, `validateLabels`).
fn check_labels(cp: &Cp, r: &Resource, causes: &mut Vec<Cause>) {
    let origin = r.labels.get(ORIGIN).map(String::as_str);
    let field = format!("labels[\"{ORIGIN}\"]");
    if let Some(o) = origin
        && o != ORIGIN_GLOBAL
        && o != ORIGIN_ZONE
    {
        causes.push(Cause::new(&field, format!("unknown origin {o:?}: must be global or zone")));
    }
    if cp.cfg.is_global() && origin.is_some_and(|o| o != ORIGIN_GLOBAL) {
        causes.push(Cause::new(&field, "the origin label must be set to 'global'"));
    }
    if cp.cfg.is_federated_zone() && r.descriptor().shape == crate::model::Shape::Nested && origin != Some(ORIGIN_ZONE)
    {
        causes.push(Cause::new(&field, "the origin label must be set to 'zone'"));
    }
    if !cp.cfg.is_global()
        && origin != Some(ORIGIN_GLOBAL)
        && let Some(z) = r.labels.get(ZONE)
        && z != &cp.cfg.zone_name
    {
        causes.push(Cause::new(
            format!("labels[\"{ZONE}\"]"),
            format!("{ZONE} label should have {} value", cp.cfg.zone_name),
        ));
    }
}

pub(super) async fn put(
    State(cp): State<Arc<Cp>>,
    peer: Option<Extension<Peer>>,
    rtype: ResourceType,
    mesh: String,
    name: String,
    req: Request,
) -> Response {
    if let Err(r) = require_admin(peer).and_then(|()| writable(&cp, rtype)) {
        return r;
    }
    let expected = match if_match(&req) {
        Ok(v) => v,
        Err(r) => return r,
    };
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
        Err(ResourceError::Invalid(c)) => {
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
    check_labels(&cp, &r, &mut causes);
    if !causes.is_empty() {
        return error(StatusCode::BAD_REQUEST, "Could not process a resource", "Resource is not valid", &causes);
    }
    if let Err(c) = validate(&r) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Could not process a resource", "Resource is not valid", &c);
    }
    if rtype.is_mesh_scoped() {
        match cp.store.get_shared(ResourceType::Mesh, "", &r.mesh).await {
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
    let existed = match cp.store.get_shared(rtype, &r.mesh, &r.name).await {
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
    labels::compute(&mut r, cp.role());
    match cp.store.upsert(r, expected).await {
        Ok(_) => {
            let status = if existed.is_some() { StatusCode::OK } else { StatusCode::CREATED };
            json_response(status, &json!({"warnings": []}))
        }
        Err(e) => store_error(e),
    }
}

/// `If-Match: "<version>"` (the `ETag` of a GET): write only over that version, else
/// Kuma's 409 conflict. `If-Match: "0"` creates only. Kuma's API has no such header (its
/// writes never fail on a concurrent change); this one only adds the check.
fn if_match(req: &Request) -> Result<Option<u64>, Response> {
    let Some(v) = req.headers().get(axum::http::header::IF_MATCH) else { return Ok(None) };
    let text = v.to_str().unwrap_or_default().trim();
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    text.parse().map(Some).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "If-Match must be the ETag of the resource (its version, e.g. \"42\")",
            &[],
        )
    })
}

pub(super) async fn delete(
    State(cp): State<Arc<Cp>>,
    peer: Option<Extension<Peer>>,
    rtype: ResourceType,
    mesh: String,
    name: String,
) -> Response {
    if let Err(r) = require_admin(peer).and_then(|()| writable(&cp, rtype)) {
        return r;
    }
    if rtype == ResourceType::Zone {
        match cp.store.get(ResourceType::ZoneInsight, "", &name).await {
            Ok(Some(insight)) if crate::kds::insight::is_online(&insight) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "Could not delete a resource",
                    "Resource is not valid",
                    &[Cause::new("zone", ZONE_STILL_CONNECTED)],
                );
            }
            Ok(_) => {}
            Err(e) => return internal(e),
        }
    }
    // Deleting a Mesh deletes what is in it; deleting a Zone what global got from it
    // (the store's owner cascade).
    let deleted = if rtype == ResourceType::Mesh {
        crate::store::delete_mesh(cp.store.as_ref(), &name).await
    } else {
        cp.store.delete(rtype, &mesh, &name).await
    };
    match deleted {
        Ok(true) => json_response(StatusCode::OK, &json!({})),
        Ok(false) => not_found(rtype, &mesh, &name),
        Err(e) => store_error(e),
    }
}
