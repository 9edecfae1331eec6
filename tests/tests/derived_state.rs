//! What a standalone zone derives from its Dataplanes stays right as they come, change and
//! go: the mesh's ServiceInsight (`kumactl inspect services`) and every ingress's
//! `availableServices`. After the first write, cp edits these in place, entry by entry
//! (the memory store edits its own copy; PostgreSQL gets the whole resource back), so each
//! step below checks both the entry that changed and one that must not have.

use e2e::postgres::Postgres;
use e2e::{Cp, temp_dir, wait_within};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

const INGRESS: &str = "type: ZoneIngress\nname: ingress-01\nnetworking:\n  address: 127.0.0.1\n  port: 10001\n  \
                       advertisedAddress: 127.0.0.1\n  advertisedPort: 10001\n";

fn dataplane(name: &str, service: &str, port: u16) -> String {
    format!(
        "type: Dataplane\nmesh: default\nname: {name}\nnetworking:\n  address: 10.0.0.1\n  inbound:\n  \
         - port: {port}\n    tags:\n      kuma.io/service: {service}\n"
    )
}

/// (offline inbounds per service in the ServiceInsight, instances per service in the
/// ingress's availableServices), each sorted by service.
type Derived = (Vec<(String, u64)>, Vec<(String, u64)>);

fn derived(cp: &Cp) -> Derived {
    let insight = cp.get_json("/meshes/default/service-insights");
    let mut offline: Vec<(String, u64)> = insight["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    (i["name"].as_str().unwrap_or("").to_string(), i["dataplanes"]["offline"].as_u64().unwrap_or(0))
                })
                .collect()
        })
        .unwrap_or_default();
    offline.sort();
    let zi = cp.get_json("/zoneingresses/ingress-01");
    let mut instances: Vec<(String, u64)> = zi["availableServices"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| {
                    let svc = s["tags"]["kuma.io/service"].as_str().unwrap_or("").to_string();
                    (svc, s["instances"].as_u64().unwrap_or(0))
                })
                .collect()
        })
        .unwrap_or_default();
    instances.sort();
    (offline, instances)
}

fn wait_derived(cp: &Cp, step: &str, want: &[(&str, u64)]) {
    let want: Vec<(String, u64)> = want.iter().map(|(s, n)| (s.to_string(), *n)).collect();
    let mut last = Derived::default();
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_within(WAIT, step, || {
            last = derived(cp);
            (last.0 == want && last.1 == want).then_some(())
        })
    }));
    if found.is_err() {
        panic!("{step}: want {want:?} in both, the insight says {:?}, the ingress says {:?}", last.0, last.1);
    }
}

/// Dataplanes without proxies are offline in the insight and counted in the ingress's list.
fn scenario(cp: &Cp) {
    cp.apply(INGRESS);
    cp.apply(&dataplane("web-1", "web", 80));
    cp.apply(&dataplane("api-1", "api", 81));
    wait_derived(cp, "first write", &[("api", 1), ("web", 1)]);
    // One more instance of a service: one entry changes.
    cp.apply(&dataplane("web-2", "web", 82));
    wait_derived(cp, "web-2 added", &[("api", 1), ("web", 2)]);
    // A new service: an entry comes.
    cp.apply(&dataplane("db-1", "db", 83));
    wait_derived(cp, "db-1 added", &[("api", 1), ("db", 1), ("web", 2)]);
    // An instance moves from one service to another: two entries change.
    cp.apply(&dataplane("web-2", "api", 82));
    wait_derived(cp, "web-2 moved to api", &[("api", 2), ("db", 1), ("web", 1)]);
    // The last instance of a service goes: its entry goes.
    cp.ctl(&["delete", "dataplane", "db-1", "-m", "default"]);
    wait_derived(cp, "db-1 deleted", &[("api", 2), ("web", 1)]);
    cp.ctl(&["delete", "dataplane", "api-1", "-m", "default"]);
    wait_derived(cp, "api-1 deleted", &[("api", 1), ("web", 1)]);
}

#[test]
fn memory_store_keeps_insight_and_available_services_right_through_changes() {
    let cp = Cp::start("zone-1");
    scenario(&cp);
}

#[test]
fn postgres_store_keeps_insight_and_available_services_right_through_changes() {
    let pg = Postgres::start();
    pg.create_db("derived");
    let store = pg.store_env("derived", pg.port);
    let env: Vec<(&str, &str)> = store.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, out) = e2e::run(&e2e::bin("cp"), &["migrate", "up"], &env);
    assert!(status.success(), "cp migrate up: {out}");
    let mut env = env;
    env.push(("KUMA_MULTIZONE_ZONE_NAME", "zone-1"));
    let cp = Cp::launch_with(temp_dir("derived-pg"), 0, 0, &env);
    scenario(&cp);
}
