//! cp on PostgreSQL (issue 15), with the real binaries and a throwaway PostgreSQL: the
//! schema and its migrations, state that survives restarts, several instances of one
//! control plane (global and zone) sharing a database with one leader, optimistic
//! concurrency, and a database that goes away and comes back.
//!
//! Several instances behind one address: the tests put a small TCP relay in front of
//! them, as a load balancer would be (cp's `KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS` and dp's
//! `--cp-address` take one address, as Kuma's do). The instances share their TLS
//! certificate, as instances behind one name must.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::mesh::{
    MESH, SYNC, Traffic, assert_no_failures, dataplane_token, free_port, sidecar_resource, wait_answered_by,
    wait_zone_status, write, zone_status,
};
use e2e::postgres::Postgres;
use e2e::{Backend, Cp, Dp, temp_dir, wait_within};
use tokio::net::{TcpListener, TcpStream};

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A database of its own for one control plane, migrated.
fn database(pg: &Postgres, name: &str) {
    pg.create_db(name);
    let (status, out) = e2e::run(&e2e::bin("cp"), &["migrate", "up"], &env_refs(&pg.store_env(name, pg.port)));
    assert!(status.success(), "cp migrate up: {out}");
}

/// `cp run` with `store` and `extra` environment in `dir`.
fn cp_on(dir: PathBuf, store: &[(String, String)], extra: &[(&str, &str)]) -> Cp {
    let mut env = env_refs(store);
    env.extend_from_slice(extra);
    Cp::launch_with(dir, 0, 0, &env)
}

/// A second instance's work directory with the first one's TLS certificate (instances
/// behind one address present one certificate).
fn sibling_dir(first: &Cp) -> PathBuf {
    let dir = temp_dir("sibling");
    for f in ["kuma-cp.crt", "kuma-cp-ca.key", "kuma-cp-server.crt", "kuma-cp-server.key", "kuma-cp-server.sans"] {
        std::fs::copy(first.dir.join(f), dir.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
    dir
}

/// One HTTP/1.1 request: (status, headers, body).
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
    let mut s = StdTcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect to the REST API");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read the response");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// The store version of a resource (its `ETag`).
fn etag(cp: &Cp, path: &str) -> String {
    let (status, head, body) = http(cp.api, "GET", path, &[], "");
    assert_eq!(status, 200, "GET {path}: {body}");
    header(&head, "etag").unwrap_or_else(|| panic!("no ETag on GET {path}: {head}"))
}

/// `leader` from the instance's `/metrics`.
fn is_leader(cp: &Cp) -> bool {
    e2e::http_get(cp.api, "/metrics").is_ok_and(|(_, body)| body.lines().any(|l| l == "leader 1"))
}

#[test]
fn cp_runs_only_on_a_migrated_schema_and_migrate_up_creates_and_upgrades_it() {
    let pg = Postgres::start();
    pg.create_db("fresh");
    let env = pg.store_env("fresh", pg.port);
    let dir = temp_dir("pg-schema");
    let work = dir.display().to_string();
    let mut run_env = env_refs(&env);
    run_env.push(("KUMA_GENERAL_WORK_DIR", &work));
    let cp = e2e::bin("cp");
    let run_args = ["run", "--api-port", "0", "--dp-server-port", "0", "--bind-address", "127.0.0.1"];

    // A database without the schema: refused, with what to run.
    let (status, out) = e2e::run(&cp, &run_args, &run_env);
    assert!(!status.success(), "{out}");
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(errors.len(), 1, "{out}");
    assert!(errors[0].contains("not migrated") && errors[0].contains("run `cp migrate up`"), "{out}");

    let (status, out) = e2e::run(&cp, &["migrate", "up"], &run_env);
    assert!(status.success() && out.contains("migrated from schema version 0 to 3"), "{out}");
    let (status, out) = e2e::run(&cp, &["migrate", "up"], &run_env);
    assert!(status.success() && out.contains("already at schema version 3"), "{out}");
    assert_eq!(pg.psql("fresh", "SELECT version FROM schema_migrations"), "3");

    // An older schema (as left by an older cp): refused until migrated up again.
    pg.psql("fresh", "UPDATE schema_migrations SET version = 1");
    let (status, out) = e2e::run(&cp, &run_args, &run_env);
    assert!(!status.success(), "{out}");
    assert!(out.contains("has schema version 1 but this cp needs version 3: run `cp migrate up`"), "{out}");
    let (status, out) = e2e::run(&cp, &["migrate", "up"], &run_env);
    assert!(status.success() && out.contains("migrated from schema version 1 to 3"), "{out}");

    // A newer one (a newer cp migrated it): refused, and migrate up does not touch it.
    pg.psql("fresh", "UPDATE schema_migrations SET version = 99");
    let (status, out) = e2e::run(&cp, &run_args, &run_env);
    assert!(!status.success() && out.contains("schema version 99, newer than this cp knows (3)"), "{out}");
    let (status, out) = e2e::run(&cp, &["migrate", "up"], &run_env);
    assert!(!status.success() && out.contains("newer than this cp knows"), "{out}");

    // A database that is not there, and a wrong password: one sentence each.
    let mut wrong = run_env.clone();
    wrong.retain(|(k, _)| *k != "KUMA_STORE_POSTGRES_PASSWORD" && *k != "KUMA_STORE_POSTGRES_DB_NAME");
    wrong.push(("KUMA_STORE_POSTGRES_DB_NAME", "fresh"));
    wrong.push(("KUMA_STORE_POSTGRES_PASSWORD", "not-the-password"));
    let (status, out) = e2e::run(&cp, &run_args, &wrong);
    assert!(!status.success() && out.contains("KUMA_STORE_POSTGRES_PASSWORD"), "{out}");
    let mut missing = run_env.clone();
    missing.retain(|(k, _)| *k != "KUMA_STORE_POSTGRES_DB_NAME");
    missing.push(("KUMA_STORE_POSTGRES_DB_NAME", "no-such-db"));
    let (status, out) = e2e::run(&cp, &run_args, &missing);
    assert!(!status.success() && out.contains("KUMA_STORE_POSTGRES_DB_NAME"), "{out}");
}

/// A JSON document's labels as (key, value) pairs.
fn labels(v: &serde_json::Value) -> Vec<(String, String)> {
    v["labels"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
        .unwrap_or_default()
}

#[test]
fn two_instances_share_one_database_and_concurrent_updates_conflict_without_losing_any() {
    let pg = Postgres::start();
    database(&pg, "conc");
    let store = pg.store_env("conc", pg.port);
    let a = cp_on(temp_dir("conc-a"), &store, &[("KUMA_MULTIZONE_ZONE_NAME", "zone-1")]);
    let b = cp_on(temp_dir("conc-b"), &store, &[("KUMA_MULTIZONE_ZONE_NAME", "zone-1")]);
    a.apply(MESH);
    // What one instance writes, the other serves, within about 100 ms (LISTEN/NOTIFY).
    let mut delays = Vec::new();
    for i in 0..10 {
        let name = format!("tp-{i}");
        a.apply(&format!(
            "type: TrafficPermission\nmesh: default\nname: {name}\nsources:\n- match:\n    kuma.io/service: '*'\ndestinations:\n- match:\n    kuma.io/service: '*'\n"
        ));
        let written = Instant::now();
        let path = format!("/meshes/default/traffic-permissions/{name}");
        while e2e::http_get(b.api, &path).map(|r| r.0).unwrap_or(0) != 200 {
            assert!(written.elapsed() < Duration::from_secs(5), "{name} never reached the other instance");
            std::thread::sleep(Duration::from_millis(1));
        }
        delays.push(written.elapsed());
    }
    delays.sort();
    assert!(delays[delays.len() / 2] < Duration::from_millis(100), "median propagation {:?}", delays);
    // A resource too big for a notification's payload travels too (the listener reads it).
    let sources: String = (0..400).map(|i| format!("- match:\n    kuma.io/service: client-{i:04}\n")).collect();
    a.apply(&format!(
        "type: TrafficPermission\nmesh: default\nname: big\nsources:\n{sources}destinations:\n- match:\n    kuma.io/service: '*'\n"
    ));
    let big = wait_within(Duration::from_secs(5), "the big resource on the other instance", || {
        let (status, body) = e2e::http_get(b.api, "/meshes/default/traffic-permissions/big").ok()?;
        (status == 200).then_some(body)
    });
    assert!(big.len() > 8000 && big.contains("client-0399"), "{}", big.len());

    // 20 writers, each adding its own label with the version it read: the first round all
    // read the same version, so exactly one wins and the rest get Kuma's conflict...
    let path = "/meshes/default/traffic-permissions/tp-0";
    let v0 = etag(&a, path);
    let doc: serde_json::Value = serde_json::from_str(&http(a.api, "GET", path, &[], "").2).unwrap();
    let results: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let (api, mut doc, v0) = (if i % 2 == 0 { a.api } else { b.api }, doc.clone(), v0.clone());
                s.spawn(move || {
                    doc["labels"][format!("writer-{i}")] = serde_json::json!("yes");
                    let (status, _, body) = http(api, "PUT", path, &[("If-Match", &v0)], &doc.to_string());
                    (status, body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 1, "{results:?}");
    for (status, body) in results.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(*status, 409, "{body}");
        let e: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(e["title"], "Conflict", "{body}");
        assert_eq!(e["type"], "/std-errors", "{body}");
        assert_eq!(
            e["detail"], "resource conflict: type=\"TrafficPermission\" name=\"tp-0\" mesh=\"default\"",
            "{body}"
        );
    }
    assert_ne!(etag(&a, path), v0);

    // ...and each loser that reads again and re-applies gets in: no update is lost.
    let done = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for i in 0..20 {
            let (api, done) = (if i % 2 == 0 { a.api } else { b.api }, &done);
            s.spawn(move || {
                let label = format!("writer-{i}");
                loop {
                    let (status, head, body) = http(api, "GET", path, &[], "");
                    assert_eq!(status, 200, "{body}");
                    let mut doc: serde_json::Value = serde_json::from_str(&body).unwrap();
                    if labels(&doc).iter().any(|(k, _)| *k == label) {
                        break; // its write is in (the first round's winner)
                    }
                    doc["labels"][&label] = serde_json::json!("yes");
                    let version = header(&head, "etag").unwrap();
                    let (status, _, body) = http(api, "PUT", path, &[("If-Match", &version)], &doc.to_string());
                    match status {
                        200 => break,
                        409 => continue, // another writer got in between: read again
                        _ => panic!("PUT: {status} {body}"),
                    }
                }
                done.lock().unwrap().push(i);
            });
        }
    });
    assert_eq!(done.lock().unwrap().len(), 20);
    for cp in [&a, &b] {
        wait_within(Duration::from_secs(5), "every writer's label on both instances", || {
            let doc: serde_json::Value = serde_json::from_str(&http(cp.api, "GET", path, &[], "").2).ok()?;
            let got = labels(&doc);
            (0..20).all(|i| got.iter().any(|(k, _)| *k == format!("writer-{i}"))).then_some(())
        });
    }
    // A conditional write of a resource that does not exist yet: `If-Match: "0"` creates.
    let (status, _, body) = http(
        a.api,
        "PUT",
        "/meshes/default/traffic-permissions/fresh",
        &[("If-Match", "\"0\"")],
        r#"{"type":"TrafficPermission","mesh":"default","name":"fresh","sources":[{"match":{"kuma.io/service":"*"}}],"destinations":[{"match":{"kuma.io/service":"*"}}]}"#,
    );
    assert_eq!(status, 201, "{body}");
}

// ---------------------------------------------------------------------------------------
// Multi-zone worlds: proxies, traffic, and a relay standing in for a load balancer.

/// A zone token minted on a global instance.
fn zone_token(global: &Cp, zone: &str) -> String {
    global
        .ctl(&["generate", "zone-token", "--zone", zone, "--scope", "ingress", "--scope", "egress"])
        .trim()
        .to_string()
}

/// `dp run` against `cp_address` (`https://localhost:<port>`), trusting `ca`.
fn start_dp(cp_address: &str, ca: &Path, proxy_type: &str, token: &str, resource: &str, env: &[(&str, &str)]) -> Dp {
    let dir = temp_dir("pg-dp");
    let token_file = write(&dir, "token", token);
    let resource_file = write(&dir, "resource.yaml", resource);
    let args = [
        format!("--proxy-type={proxy_type}"),
        format!("--cp-address={cp_address}"),
        "--dataplane-token-file".into(),
        token_file.display().to_string(),
        "--ca-cert-file".into(),
        ca.display().to_string(),
        "--dataplane-file".into(),
        resource_file.display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut all = vec![("KUMA_DNS_ENABLED", "false")];
    all.extend_from_slice(env);
    Dp::spawn(&args, &all)
}

fn dp_address(zone: &Cp) -> String {
    format!("https://localhost:{}", zone.dp_server.port())
}

/// A zone ingress on 127.0.0.1:`port`, advertised there.
fn start_ingress(global: &Cp, zone: &Cp, zone_name: &str) -> Dp {
    let port = free_port();
    let resource = format!(
        "type: ZoneIngress\nname: ingress-01\nnetworking:\n  address: 127.0.0.1\n  port: {port}\n  \
         advertisedAddress: 127.0.0.1\n  advertisedPort: {port}\n"
    );
    let dp = start_dp(&dp_address(zone), &zone.ca_file, "ingress", &zone_token(global, zone_name), &resource, &[]);
    dp.wait_ready();
    dp
}

/// A sidecar of `app` serving `service`, with outbounds (port, service), against
/// `cp_address`; the token comes from `zone`.
fn start_sidecar(
    zone: &Cp,
    cp_address: &str,
    name: &str,
    service: &str,
    app: &Backend,
    outbounds: &[(u16, &str)],
) -> Dp {
    let resource = sidecar_resource(name, service, app, outbounds);
    let dp = start_dp(cp_address, &zone.ca_file, "dataplane", &dataplane_token(zone, name), &resource, &[]);
    dp.wait_ready();
    dp
}

/// An instance's id (`GET /`).
fn instance_id(cp: &Cp) -> String {
    cp.get_json("/")["instanceId"].as_str().unwrap().to_string()
}

/// The newest subscription of `zone`'s ZoneInsight on `cp`.
fn last_subscription(cp: &Cp, zone: &str) -> Option<serde_json::Value> {
    let (status, body) = e2e::http_get(cp.api, &format!("/zone-insights/{zone}")).ok()?;
    (status == 200).then_some(())?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["subscriptions"].as_array()?.last().cloned()
}

/// A TCP relay standing in for a load balancer (or a network path): each new connection
/// goes to the next upstream in turn, skipping those that refuse it. It can be cut (every
/// connection closed, none accepted) and restored on the same port.
struct Relay {
    port: u16,
    upstreams: Arc<Mutex<Vec<SocketAddr>>>,
    next: Arc<AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(upstreams: Vec<SocketAddr>) -> Relay {
        let mut r = Relay {
            port: free_port(),
            upstreams: Arc::new(Mutex::new(upstreams)),
            next: Arc::new(AtomicUsize::new(0)),
            task: None,
        };
        r.restore().await;
        r
    }

    fn add(&self, upstream: SocketAddr) {
        self.upstreams.lock().unwrap().push(upstream);
    }

    async fn restore(&mut self) {
        let l = TcpListener::bind(("127.0.0.1", self.port)).await.expect("relay port");
        let (upstreams, next) = (self.upstreams.clone(), self.next.clone());
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut down, _)) = l.accept().await {
                let ups = upstreams.lock().unwrap().clone();
                let first = next.fetch_add(1, Ordering::Relaxed);
                conns.spawn(async move {
                    for i in 0..ups.len() {
                        if let Ok(mut up) = TcpStream::connect(ups[(first + i) % ups.len()]).await {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                            return;
                        }
                    }
                });
            }
        }));
    }

    /// No new connections, and every open one closed.
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Two zones with an ingress each, `echo` in zone-2 and a client in zone-1 whose
/// outbound `echo` answers from zone-2.
struct World {
    zone1: Cp,
    zone2: Cp,
    _proxies: Vec<Dp>,
    _echo: Backend,
    client: Dp,
    outbound: SocketAddr,
}

impl World {
    /// Zones dial global at `kds` trusting `ca`; tokens come from `global`.
    async fn start(global: &Cp, kds: &str, ca: &Path) -> World {
        let zone1 = Cp::federated_via(temp_dir("pg-zone-1"), "zone-1", kds, ca, 0, &[]);
        let zone2 = Cp::federated_via(temp_dir("pg-zone-2"), "zone-2", kds, ca, 0, &[]);
        zone1.wait_federated();
        zone2.wait_federated();
        let ingress1 = start_ingress(global, &zone1, "zone-1");
        let ingress2 = start_ingress(global, &zone2, "zone-2");
        let echo = Backend::start("echo-zone-2").await;
        let echo_dp = start_sidecar(&zone2, &dp_address(&zone2), "echo-1", "echo", &echo, &[]);
        let out_port = free_port();
        let web = Backend::start("web").await;
        let client = start_sidecar(&zone1, &dp_address(&zone1), "web-1", "web", &web, &[(out_port, "echo")]);
        let outbound: SocketAddr = format!("127.0.0.1:{out_port}").parse().unwrap();
        wait_answered_by(outbound, "echo-zone-2", &[&client, &ingress2, &echo_dp]).await;
        World { zone1, zone2, _proxies: vec![ingress1, ingress2, echo_dp], _echo: echo, client, outbound }
    }
}

/// The `data` of a global secret on `cp`.
fn global_secret(cp: &Cp, name: &str) -> String {
    cp.get_json(&format!("/global-secrets/{name}"))["data"].as_str().unwrap().to_string()
}

/// Name of the only resource of a list (a policy under its hashed name on a zone).
fn only_name(cp: &Cp, path: &str) -> String {
    let names = wait_within(SYNC, &format!("one item in {path}"), || Some(cp.names(path)).filter(|n| n.len() == 1));
    names[0].clone()
}

const POLICY: &str = "type: TrafficPermission\nmesh: default\nname: allow-all\nsources:\n- match:\n    kuma.io/service: '*'\ndestinations:\n- match:\n    kuma.io/service: '*'\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_on_postgres_restarts_with_its_state_while_zones_keep_serving() {
    let pg = Postgres::start();
    database(&pg, "global");
    let store = pg.store_env("global", pg.port);
    let global_env = [("KUMA_MODE", "global")];
    let mut global = cp_on(temp_dir("pg-global"), &store, &global_env);
    global.apply(MESH);
    global.apply(POLICY);
    let kds = global.kds_address();
    let w = World::start(&global, &kds, &global.ca_file).await;
    let policy = only_name(&w.zone1, "/meshes/default/traffic-permissions");

    // What must survive, and the versions that a delete-and-recreate would change.
    let signing_key = global_secret(&global, "zone-token-signing-key-1");
    let token_before = zone_token(&global, "zone-1");
    let ca_secret =
        w.zone1.names("/meshes/default/secrets").into_iter().find(|s| s.contains("ca-builtin-cert")).unwrap();
    let zone2_ingress = w.zone1.get_json("/zoneingresses")["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["zone"] == "zone-2")
        .map(|i| i["name"].as_str().unwrap().to_string())
        .expect("zone-2's ingress in zone-1");
    let zone_paths = [
        "/meshes/default".to_string(),
        format!("/meshes/default/traffic-permissions/{policy}"),
        format!("/meshes/default/secrets/{ca_secret}"),
        format!("/zoneingresses/{zone2_ingress}"),
    ];
    let zone_versions: Vec<String> = zone_paths.iter().map(|p| etag(&w.zone1, p)).collect();
    let global_dps = global.names("/meshes/default/dataplanes");
    assert_eq!(global_dps.len(), 2, "{global_dps:?}");
    let global_paths: Vec<String> = global_dps.iter().map(|n| format!("/meshes/default/dataplanes/{n}")).collect();
    let global_versions: Vec<String> = global_paths.iter().map(|p| etag(&global, p)).collect();

    let traffic = Traffic::start(w.outbound);
    traffic.wait_more(10).await;
    let (dir, kds_port) = (global.dir.clone(), global.kds.unwrap().port());
    global.kill();
    traffic.wait_more(10).await;
    let mut env = env_refs(&store);
    env.extend_from_slice(&global_env);
    let global = Cp::launch_with(dir, 0, kds_port, &env);
    wait_zone_status(&global, "zone-1", "Online");
    wait_zone_status(&global, "zone-2", "Online");

    // Zones, Meshes, policies and the signing key came back from the database.
    assert_eq!(global.names("/zones"), vec!["zone-1", "zone-2"]);
    assert_eq!(global.names("/meshes"), vec!["default"]);
    assert_eq!(global.names("/meshes/default/traffic-permissions"), vec!["allow-all"]);
    assert_eq!(global_secret(&global, "zone-token-signing-key-1"), signing_key);
    // Nothing was deleted and re-created by the initial syncs, either way.
    traffic.wait_more(20).await;
    let after: Vec<String> = zone_paths.iter().map(|p| etag(&w.zone1, p)).collect();
    assert_eq!(after, zone_versions, "zone-1's copies of global's resources were rewritten: {zone_paths:?}");
    let after: Vec<String> = global_paths.iter().map(|p| etag(&global, p)).collect();
    assert_eq!(after, global_versions, "global's copies of the zones' Dataplanes were rewritten: {global_paths:?}");
    // A zone token minted before the restart still admits a proxy.
    let port = free_port();
    let resource = format!(
        "type: ZoneIngress\nname: ingress-02\nnetworking:\n  address: 127.0.0.1\n  port: {port}\n  \
         advertisedAddress: 127.0.0.1\n  advertisedPort: {port}\n"
    );
    let late = start_dp(&dp_address(&w.zone1), &w.zone1.ca_file, "ingress", &token_before, &resource, &[]);
    late.wait_ready();

    let outcomes = traffic.finish().await;
    assert_no_failures(&outcomes, &["echo-zone-2"]);
    drop(w.client);
    drop(w.zone2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_global_instances_the_leader_dies_and_the_other_leads_and_serves_the_zones() {
    let pg = Postgres::start();
    database(&pg, "global");
    let store = pg.store_env("global", pg.port);
    let global_env = [("KUMA_MODE", "global")];
    let mut ga = cp_on(temp_dir("pg-global-a"), &store, &global_env);
    wait_within(Duration::from_secs(15), "the first instance to lead", || is_leader(&ga).then_some(()));
    let gb = cp_on(sibling_dir(&ga), &store, &global_env);
    ga.apply(MESH);
    // The zones reach global through one address, in front of both instances.
    let relay = Relay::start(vec![ga.kds.unwrap(), gb.kds.unwrap()]).await;
    let kds = format!("grpcs://localhost:{}", relay.port);
    let w = World::start(&ga, &kds, &ga.ca_file).await;
    assert!(!is_leader(&gb), "two leaders");
    let (id_a, id_b) = (instance_id(&ga), instance_id(&gb));
    // Each zone's insight names the global instance its stream is on; both show Online
    // on both instances.
    for z in ["zone-1", "zone-2"] {
        let on = last_subscription(&ga, z).unwrap()["globalInstanceId"].as_str().unwrap().to_string();
        assert!(on == id_a || on == id_b, "{z} on {on}");
        wait_zone_status(&gb, z, "Online");
    }

    let traffic = Traffic::start(w.outbound);
    traffic.wait_more(10).await;
    ga.kill();
    let killed = Instant::now();
    wait_within(Duration::from_secs(15), "the other instance to lead", || is_leader(&gb).then_some(()));
    let took = killed.elapsed();
    // The zones are back through the surviving instance, which their insights record.
    for z in ["zone-1", "zone-2"] {
        wait_within(SYNC, &format!("{z} to reconnect through the other instance"), || {
            let s = last_subscription(&gb, z)?;
            (s["globalInstanceId"] == id_b.as_str() && s.get("disconnectTime").is_none()).then_some(())
        });
        wait_zone_status(&gb, z, "Online");
    }
    assert_eq!(zone_status(&gb).len(), 2);
    // The new leader does a leader's work: a Mesh applied now gets its CA, and reaches
    // the zones with it.
    gb.apply(
        "type: Mesh\nname: other\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n",
    );
    wait_within(SYNC, "the new mesh's CA on the zones", || {
        let ok = [&w.zone1, &w.zone2]
            .iter()
            .all(|z| z.names("/meshes/other/secrets").iter().any(|s| s.contains("ca-builtin-cert")));
        ok.then_some(())
    });
    traffic.wait_more(20).await;
    let outcomes = traffic.finish().await;
    assert_no_failures(&outcomes, &["echo-zone-2"]);
    eprintln!("leadership moved {took:?} after the leader was killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_zone_instances_proxies_of_the_dead_one_move_to_the_other_and_keep_getting_changes() {
    let pg = Postgres::start();
    database(&pg, "zone");
    let global = Cp::global();
    global.apply(MESH);
    // Proxies reach the zone through one address in front of both instances; the
    // bootstrap sends their ADS there too (KUMA_BOOTSTRAP_SERVER_PARAMS_XDS_*).
    let relay = Relay::start(vec![]).await;
    let (kds, ca, port) = (global.kds_address(), global.ca_file.display().to_string(), relay.port.to_string());
    let zone_env = [
        ("KUMA_MODE", "zone"),
        ("KUMA_MULTIZONE_ZONE_NAME", "zone-1"),
        ("KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS", kds.as_str()),
        ("KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE", ca.as_str()),
        ("KUMA_BOOTSTRAP_SERVER_PARAMS_XDS_HOST", "localhost"),
        ("KUMA_BOOTSTRAP_SERVER_PARAMS_XDS_PORT", port.as_str()),
    ];
    let store = pg.store_env("zone", pg.port);
    let za = cp_on(temp_dir("pg-zone-a"), &store, &zone_env);
    za.wait_federated();
    let zb = cp_on(sibling_dir(&za), &store, &zone_env);
    relay.add(za.dp_server);
    relay.add(zb.dp_server);
    let address = format!("https://localhost:{}", relay.port);
    let (ida, idb) = (instance_id(&za), instance_id(&zb));
    // Only the leader talks to global.
    wait_zone_status(&global, "zone-1", "Online");
    let leader_id = last_subscription(&global, "zone-1").unwrap()["zoneInstanceId"].as_str().unwrap().to_string();
    assert_eq!(leader_id, if is_leader(&za) { ida.clone() } else { idb.clone() });

    let echo = Backend::start("echo-1").await;
    let echo_dp = start_sidecar(&za, &address, "echo-1", "echo", &echo, &[]);
    let out_port = free_port();
    let web = Backend::start("web").await;
    let client = start_sidecar(&za, &address, "web-1", "web", &web, &[(out_port, "echo")]);
    let outbound: SocketAddr = format!("127.0.0.1:{out_port}").parse().unwrap();
    wait_answered_by(outbound, "echo-1", &[&client, &echo_dp]).await;

    // Kill the instance the client's stream is on.
    let stream_on = |cp: &Cp| {
        let (status, body) = e2e::http_get(cp.api, "/meshes/default/dataplane-insights/web-1").ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
        let s = v["subscriptions"].as_array().and_then(|a| a.last()).cloned()?;
        (s.get("disconnectTime").is_none()).then(|| s["controlPlaneInstanceId"].as_str().unwrap_or("").to_string())
    };
    let on = wait_within(SYNC, "the client's stream in its insight", || stream_on(&za));
    let (mut victim, survivor, survivor_id) = if on == ida { (za, zb, idb) } else { (zb, za, ida) };
    let traffic = Traffic::start(outbound);
    traffic.wait_more(10).await;
    victim.kill();
    // Its proxies reconnect to the survivor, with their configuration in force meanwhile.
    wait_within(SYNC, "the client to reconnect to the other instance", || {
        (stream_on(&survivor).as_deref() == Some(survivor_id.as_str())).then_some(())
    });
    wait_within(Duration::from_secs(15), "the survivor to lead", || is_leader(&survivor).then_some(()));
    // A Dataplane that joins now reaches the client through the survivor.
    let echo2 = Backend::start("echo-2").await;
    let echo2_dp = start_sidecar(&survivor, &address, "echo-2", "echo", &echo2, &[]);
    wait_answered_by(outbound, "echo-2", &[&client, &echo2_dp]).await;
    // And global learns of it from the new leader.
    wait_within(SYNC, "global to see echo-2", || {
        global.names("/meshes/default/dataplanes").iter().any(|n| n.starts_with("echo-2")).then_some(())
    });
    assert_eq!(last_subscription(&global, "zone-1").unwrap()["zoneInstanceId"], survivor_id.as_str());
    traffic.wait_more(20).await;
    let outcomes = traffic.finish().await;
    assert_no_failures(&outcomes, &["echo-1", "echo-2"]);
    // The dead instance's proxies stay registered (the survivor holds their streams).
    assert!(survivor.names("/meshes/default/dataplanes").contains(&"web-1".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_keeps_proxies_served_fails_writes_clearly_and_heals_without_a_restart() {
    let pg = Postgres::start();
    database(&pg, "zone");
    let mut link = Relay::start(vec![pg.addr()]).await;
    let store = pg.store_env("zone", link.port);
    let zone = cp_on(temp_dir("pg-outage"), &store, &[("KUMA_MULTIZONE_ZONE_NAME", "zone-1")]);
    zone.apply(MESH);
    let address = dp_address(&zone);
    let echo = Backend::start("echo-1").await;
    let echo_dp = start_sidecar(&zone, &address, "echo-1", "echo", &echo, &[]);
    let out_port = free_port();
    let web = Backend::start("web").await;
    let client = start_sidecar(&zone, &address, "web-1", "web", &web, &[(out_port, "echo")]);
    let outbound: SocketAddr = format!("127.0.0.1:{out_port}").parse().unwrap();
    wait_answered_by(outbound, "echo-1", &[&client, &echo_dp]).await;
    let traffic = Traffic::start(outbound);
    traffic.wait_more(10).await;

    eprintln!("cut at {}", traffic.count());
    link.cut();
    // Writes fail, saying why and that the proxies are still served...
    let f = write(&zone.dir, "tp.yaml", POLICY);
    let (status, out) = zone.ctl_status(&["apply", "-f", f.to_str().unwrap()]);
    assert!(!status.success(), "{out}");
    assert!(out.contains("Service unavailable") && out.contains("the database (PostgreSQL at 127.0.0.1:"), "{out}");
    assert!(out.contains("nothing was written. The control plane keeps serving its proxies from memory"), "{out}");
    let (code, _, body) = http(
        zone.api,
        "PUT",
        "/meshes/default/traffic-permissions/allow-all",
        &[],
        r#"{"type":"TrafficPermission","mesh":"default","name":"allow-all","sources":[{"match":{"kuma.io/service":"*"}}],"destinations":[{"match":{"kuma.io/service":"*"}}]}"#,
    );
    assert_eq!(code, 503, "{body}");
    // ...reads are served from memory, and so are the proxies.
    assert_eq!(zone.names("/meshes/default/dataplanes").len(), 2);
    traffic.wait_more(30).await;
    wait_within(Duration::from_secs(15), "the zone to step down (no lease without the database)", || {
        (!is_leader(&zone)).then_some(())
    });

    eprintln!("restore at {}", traffic.count());
    link.restore().await;
    // Everything resumes without a restart: writes, leadership, and new proxies.
    wait_within(SYNC, "writes to succeed again", || {
        zone.ctl_status(&["apply", "-f", f.to_str().unwrap()]).0.success().then_some(())
    });
    wait_within(Duration::from_secs(15), "the zone to lead again", || is_leader(&zone).then_some(()));
    eprintln!("echo-2 at {}", traffic.count());
    let echo2 = Backend::start("echo-2").await;
    let echo2_dp = start_sidecar(&zone, &address, "echo-2", "echo", &echo2, &[]);
    eprintln!("echo-2 ready at {}", traffic.count());
    wait_answered_by(outbound, "echo-2", &[&client, &echo2_dp]).await;
    let outcomes = traffic.finish().await;
    assert_no_failures(&outcomes, &["echo-1", "echo-2"]);
}

#[test]
fn the_database_connection_can_use_tls_and_refuses_a_server_it_cannot_verify() {
    let pg = Postgres::start_tls();
    pg.create_db("tls");
    let ca = pg.ca_file.clone().unwrap().display().to_string();
    let mut env = pg.store_env("tls", pg.port);
    env.retain(|(k, _)| k != "KUMA_STORE_POSTGRES_TLS_MODE");
    let with = |extra: &[(&str, &str)]| {
        let mut all = env_refs(&env);
        all.extend_from_slice(extra);
        e2e::run(&e2e::bin("cp"), &["migrate", "up"], &all)
    };
    // verifyFull: the certificate must chain to the CA and name the host.
    let (status, out) =
        with(&[("KUMA_STORE_POSTGRES_TLS_MODE", "verifyFull"), ("KUMA_STORE_POSTGRES_TLS_CA_PATH", ca.as_str())]);
    assert!(status.success() && out.contains("migrated from schema version 0 to 3"), "{out}");
    // A CA that did not sign it: refused, saying it is the certificate.
    let other = temp_dir("other-ca").join("ca.pem");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(&other, cert.cert.pem()).unwrap();
    let other = other.display().to_string();
    let (status, out) =
        with(&[("KUMA_STORE_POSTGRES_TLS_MODE", "verifyFull"), ("KUMA_STORE_POSTGRES_TLS_CA_PATH", other.as_str())]);
    assert!(
        !status.success() && out.contains("certificate") && out.contains("KUMA_STORE_POSTGRES_TLS_CA_PATH"),
        "{out}"
    );
    // verifyNone encrypts without checking; a control plane runs over it.
    let mut all = env_refs(&env);
    all.extend([("KUMA_STORE_POSTGRES_TLS_MODE", "verifyNone"), ("KUMA_MULTIZONE_ZONE_NAME", "zone-1")]);
    let cp = Cp::launch_with(temp_dir("pg-tls"), 0, 0, &all);
    cp.apply(MESH);
    assert_eq!(pg.psql("tls", "SELECT count(*) FROM resources WHERE type = 'Mesh'"), "1");
    let ssl = pg.psql("tls", "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'kuma-cp'");
    assert_eq!(ssl, "t", "cp's connections are not all TLS");
}

/// An instance reads its own writes even while its change listener is reconnecting (the
/// window after a database outage): a write waits for the listener's re-read instead of
/// returning before its change is in the copy that reads are served from. Without that,
/// a proxy's "serving" insight write could find no insight in the copy and be dropped,
/// and the proxy never became an endpoint (the outage test above failed so, now and then).
/// Each round cuts every connection of cp (the listener's too) and at once writes a policy
/// and reads it back.
#[test]
fn a_write_made_while_the_change_listener_reconnects_is_read_back_at_once() {
    let pg = Postgres::start();
    database(&pg, "rw");
    let zone = cp_on(temp_dir("pg-rw"), &pg.store_env("rw", pg.port), &[("KUMA_MULTIZONE_ZONE_NAME", "zone-1")]);
    zone.apply(MESH);
    for i in 0..5 {
        let cut = pg.psql("rw", "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = 'rw' AND pid <> pg_backend_pid()");
        assert!(cut.trim().parse::<u32>().is_ok_and(|n| n > 0), "no cp connection to cut: {cut}");
        let name = format!("tp-{i}");
        let path = format!("/meshes/default/traffic-permissions/{name}");
        let body = format!(
            r#"{{"type":"TrafficPermission","mesh":"default","name":"{name}","sources":[{{"match":{{"kuma.io/service":"*"}}}}],"destinations":[{{"match":{{"kuma.io/service":"*"}}}}]}}"#
        );
        // The first write after the cut may meet a pooled connection that is gone.
        let (code, _, out) = wait_within(Duration::from_secs(15), "the write to succeed", || {
            let r = http(zone.api, "PUT", &path, &[], &body);
            (r.0 != 503).then_some(r)
        });
        assert!(code == 200 || code == 201, "PUT {path}: {code} {out}");
        let (code, _, out) = http(zone.api, "GET", &path, &[], "");
        assert_eq!(code, 200, "round {i}: the write is not read back: {out}");
    }
}
