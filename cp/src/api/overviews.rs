//! Overviews (a resource with its insight, `kumactl inspect ...`) and the per-service view
//! of ServiceInsights (`kumactl inspect services`).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use serde_json::{Map, Value, json};

use super::resources::{ListQuery, page};
use super::{error, internal, json_response, not_found};
use crate::context::Cp;
use crate::model::{Resource, ResourceType, labels};

/// The overview of a type: its name and the keys of the resource and insight in it.
fn shape(rtype: ResourceType) -> (&'static str, &'static str, &'static str) {
    match rtype {
        ResourceType::Zone => ("ZoneOverview", "zone", "zoneInsight"),
        ResourceType::ZoneIngress => ("ZoneIngressOverview", "zoneIngress", "zoneIngressInsight"),
        ResourceType::ZoneEgress => ("ZoneEgressOverview", "zoneEgress", "zoneEgressInsight"),
        _ => ("DataplaneOverview", "dataplane", "dataplaneInsight"),
    }
}

/// `_overview` routes of the types with insights, with Kuma's aliases and legacy paths.
const OVERVIEW_PATHS: &[(ResourceType, &str, &str)] = &[
    (ResourceType::Zone, "/zones/_overview", "/zones/{name}/_overview"),
    (ResourceType::Zone, "/zones+insights", "/zones+insights/{name}"),
    (ResourceType::ZoneIngress, "/zoneingresses/_overview", "/zoneingresses/{name}/_overview"),
    (ResourceType::ZoneIngress, "/zone-ingresses/_overview", "/zone-ingresses/{name}/_overview"),
    (ResourceType::ZoneIngress, "/zoneingresses+insights", "/zoneingresses+insights/{name}"),
    (ResourceType::ZoneEgress, "/zoneegresses/_overview", "/zoneegresses/{name}/_overview"),
    (ResourceType::ZoneEgress, "/zone-egresses/_overview", "/zone-egresses/{name}/_overview"),
    (ResourceType::ZoneEgress, "/zoneegressoverviews", "/zoneegressoverviews/{name}"),
];

pub(super) fn routes(mut r: Router<Arc<Cp>>) -> Router<Arc<Cp>> {
    for &(t, list_path, one_path) in OVERVIEW_PATHS {
        r = r
            .route(list_path, get(move |s, q| list(s, t, None, q)))
            .route(one_path, get(move |s, Path(n): Path<String>| one(s, t, String::new(), n)));
    }
    let t = ResourceType::Dataplane;
    for base in ["/meshes/{mesh}/dataplanes/_overview", "/meshes/{mesh}/dataplanes+insights"] {
        r = r.route(base, get(move |s, Path(m): Path<String>, q| list(s, t, Some(m), q)));
    }
    r.route(
        "/meshes/{mesh}/dataplanes/{name}/_overview",
        get(move |s, Path((m, n)): Path<(String, String)>| one(s, t, m, n)),
    )
    .route("/dataplanes/_overview", get(move |s, q| list(s, t, None, q)))
}

fn overview(r: &Resource, insight: Option<&Resource>) -> Value {
    let (kind, res_key, insight_key) = shape(r.rtype);
    let mut m = Map::new();
    m.insert("type".into(), kind.into());
    if r.rtype.is_mesh_scoped() {
        m.insert("mesh".into(), r.mesh.clone().into());
    }
    m.insert("name".into(), r.name.clone().into());
    m.insert("creationTime".into(), r.creation_time.clone().into());
    m.insert("modificationTime".into(), r.modification_time.clone().into());
    if !r.labels.is_empty() {
        m.insert("labels".into(), json!(r.labels));
    }
    m.insert(res_key.into(), Value::Object(r.spec.clone()));
    m.insert(insight_key.into(), insight.map_or_else(|| json!({}), |i| Value::Object(i.spec.clone())));
    Value::Object(m)
}

async fn list(
    State(cp): State<Arc<Cp>>,
    rtype: ResourceType,
    mesh: Option<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    let insight_type = rtype.descriptor().insight.unwrap_or(ResourceType::DataplaneInsight);
    let (items, insights) =
        match (cp.store.list(rtype, mesh.as_deref()).await, cp.store.list(insight_type, mesh.as_deref()).await) {
            (Ok(i), Ok(s)) => (i, s),
            (Err(e), _) | (_, Err(e)) => return internal(e),
        };
    let values =
        items.iter().map(|r| overview(r, insights.iter().find(|i| i.mesh == r.mesh && i.name == r.name))).collect();
    let base = match &mesh {
        Some(m) => format!("/meshes/{m}/{}/_overview", rtype.plural()),
        None => format!("/{}/_overview", rtype.plural()),
    };
    page(values, &q, &base)
}

async fn one(State(cp): State<Arc<Cp>>, rtype: ResourceType, mesh: String, name: String) -> Response {
    let insight_type = rtype.descriptor().insight.unwrap_or(ResourceType::DataplaneInsight);
    match (cp.store.get(rtype, &mesh, &name).await, cp.store.get(insight_type, &mesh, &name).await) {
        (Ok(Some(r)), Ok(i)) => json_response(StatusCode::OK, &overview(&r, i.as_ref())),
        (Ok(None), _) => not_found(rtype, &mesh, &name),
        (Err(e), _) | (_, Err(e)) => internal(e),
    }
}

/// Every service of every ServiceInsight of the mesh, one item each (Kuma keeps one
/// insight per mesh and expands it here; a zone's copy from global has a hashed name).
async fn expanded(cp: &Cp, mesh: &str) -> Result<Vec<Value>, Response> {
    let insights = cp.store.list(ResourceType::ServiceInsight, Some(mesh)).await.map_err(internal)?;
    let mut items = Vec::new();
    for si in insights {
        let Some(Value::Object(services)) = si.spec.get("services") else { continue };
        for (name, stat) in services {
            items.push(service_item(&si, name, stat, cp.cfg.service_vip_port));
        }
    }
    items.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(items)
}

/// One service: its stat plus what Kuma fills in at read time (`total`, `addressPort`).
fn service_item(si: &Resource, name: &str, stat: &Value, vip_port: u32) -> Value {
    let mut m = Map::new();
    m.insert("type".into(), "ServiceInsight".into());
    m.insert("mesh".into(), si.mesh.clone().into());
    m.insert("name".into(), name.into());
    m.insert("creationTime".into(), si.creation_time.clone().into());
    m.insert("modificationTime".into(), si.modification_time.clone().into());
    let mut labels_out = si.labels.clone();
    labels_out.remove(labels::DISPLAY_NAME);
    if !labels_out.is_empty() {
        m.insert("labels".into(), json!(labels_out));
    }
    let mut stat = stat.as_object().cloned().unwrap_or_default();
    let count = |k: &str| stat.get("dataplanes").and_then(|d| d.get(k)).and_then(Value::as_u64).unwrap_or(0);
    let total = count("online") + count("offline");
    if let Some(Value::Object(d)) = stat.get_mut("dataplanes") {
        d.insert("total".into(), total.into());
    }
    if stat.get("serviceType").is_none_or(|t| t == "internal") {
        stat.insert("addressPort".into(), format!("{name}.{}:{vip_port}", crate::vips::DNS_DOMAIN).into());
    }
    m.extend(stat);
    Value::Object(m)
}

pub(super) async fn service_insights(
    State(cp): State<Arc<Cp>>,
    Path(mesh): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    match expanded(&cp, &mesh).await {
        Ok(items) => page(items, &q, &format!("/meshes/{mesh}/service-insights")),
        Err(r) => r,
    }
}

pub(super) async fn service_insight(State(cp): State<Arc<Cp>>, Path((mesh, svc)): Path<(String, String)>) -> Response {
    match expanded(&cp, &mesh).await {
        Ok(items) => match items.into_iter().find(|i| i["name"] == svc.as_str()) {
            Some(i) => json_response(StatusCode::OK, &i),
            None => error(
                StatusCode::NOT_FOUND,
                "Could not retrieve a resource",
                &format!("service {svc:?} not found in mesh {mesh:?}"),
                &[],
            ),
        },
        Err(r) => r,
    }
}
