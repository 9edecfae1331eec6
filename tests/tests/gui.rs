//! The web UI (`/gui` on the REST port) in a real browser: a global `cp`, two zone `cp`s
//! with a `dp` zone ingress each, an `echo` app behind a `dp` sidecar in zone-2 and a `web`
//! Dataplane applied through zone-1's API; then headless Chromium, driven by Playwright
//! (tests/gui/gui.mjs), checks the pages, takes a screenshot of each at laptop and phone
//! size, and follows the zones live while this test kills zone-2's CP, disables zone-1 and
//! finally kills global. The script asks for each of those with an `ACTION <name>` line and
//! waits for `DONE <name>` on its standard input.
//!
//! Needs Debian's Chromium and the npm packages of tests/gui: `scripts/setup-gui.sh`.

use e2e::mesh::free_port;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::{Backend, Cp, Dp, temp_dir, wait_within};
use serde_json::json;

use e2e::mesh::MESH;
/// What the seed guide and Kuma promise for convergence across zones.
const SYNC: Duration = Duration::from_secs(30);
const CHROMIUM: &str = "/usr/bin/chromium";
/// The script's own bound is 240 s; this one only catches a script that hangs.
const SCRIPT_LIMIT: Duration = Duration::from_secs(300);

fn gui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("gui")
}

/// The browser test's tools, or one sentence saying how to get them.
fn require_browser_tools() {
    let playwright = gui_dir().join("node_modules/playwright-core/package.json");
    let node = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(
        Path::new(CHROMIUM).exists() && playwright.exists() && node,
        "the web UI test needs {CHROMIUM}, Node.js and tests/gui/node_modules: run scripts/setup-gui.sh first"
    );
}

/// Where the screenshots go: `<target>/<profile>/gui-screenshots` (emptied first).
fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>
    let dir = exe.parent().and_then(Path::parent).expect("target dir").join("gui-screenshots");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the screenshot folder");
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Waits until a federated zone has what global gives every zone before its proxies can
/// connect: the Mesh with its CA, the dataplane-token signing key, the zone-token public key.
fn wait_federated(zone: &Cp) {
    wait_within(SYNC, "the mesh, its CA and the signing keys to reach the zone", || {
        let secrets = zone.names("/meshes/default/secrets");
        let ok = zone.names("/meshes").contains(&"default".to_string())
            && secrets.contains(&"default.ca-builtin-cert-ca-1".to_string())
            && secrets.iter().any(|s| s.starts_with("dataplane-token-signing-key-default"))
            && zone.names("/global-secrets").iter().any(|s| s.starts_with("zone-token-signing-public-key-"));
        ok.then_some(())
    });
}

fn start_dp(zone: &Cp, proxy_type: &str, token: &str, resource: &str, env: &[(&str, &str)]) -> Dp {
    let dir = temp_dir("gui-dp");
    let token_file = write(&dir, "token", token);
    let resource_file = write(&dir, "resource.yaml", resource);
    Dp::against(zone, proxy_type, &token_file, &resource_file, env)
}

/// A zone ingress on 127.0.0.1:`port`, advertised there, with a zone token from global.
fn start_ingress(global: &Cp, zone: &Cp, zone_name: &str, port: u16) -> Dp {
    let token = global.ctl(&["generate", "zone-token", "--zone", zone_name, "--scope", "ingress"]).trim().to_string();
    let resource = format!(
        "type: ZoneIngress\nname: ingress-01\nnetworking:\n  address: 127.0.0.1\n  port: {port}\n  \
         advertisedAddress: 127.0.0.1\n  advertisedPort: {port}\n"
    );
    let dp = start_dp(zone, "ingress", &token, &resource, &[]);
    dp.wait_ready();
    dp
}

/// A sidecar for `app` serving `service`.
fn start_sidecar(zone: &Cp, name: &str, service: &str, app: &Backend) -> Dp {
    let resource = format!(
        "type: Dataplane\nmesh: default\nname: {name}\nnetworking:\n  address: 127.0.0.1\n  inbound:\n  \
         - port: {}\n    servicePort: {}\n    tags:\n      kuma.io/service: {service}\n      version: v1\n",
        free_port(),
        app.addr.port()
    );
    let token = wait_within(SYNC, "the dataplane token signing key to reach the zone", || {
        let (status, out) = zone.ctl_status(&["generate", "dataplane-token", "--name", name, "-m", "default"]);
        status.success().then(|| out.trim().to_string())
    });
    let dp = start_dp(zone, "dataplane", &token, &resource, &[("KUMA_DNS_ENABLED", "false")]);
    dp.wait_ready();
    dp
}

/// The zone of each ingress global knows, with its advertised address and services.
fn ingresses_on(global: &Cp) -> Vec<(String, String, Vec<String>)> {
    let v = global.get_json("/zoneingresses");
    v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    let n = &i["networking"];
                    let services = i["availableServices"]
                        .as_array()
                        .map(|s| {
                            s.iter().filter_map(|s| s["tags"]["kuma.io/service"].as_str().map(String::from)).collect()
                        })
                        .unwrap_or_default();
                    let advertised =
                        format!("{}:{}", n["advertisedAddress"].as_str().unwrap_or(""), n["advertisedPort"]);
                    (i["zone"].as_str().unwrap_or("").to_string(), advertised, services)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn zones_online(global: &Cp) -> usize {
    let v = global.get_json("/zones/_overview");
    v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|z| {
                    z["zoneInsight"]["subscriptions"].as_array().is_some_and(|s| {
                        s.iter().any(|s| s.get("connectTime").is_some() && s.get("disconnectTime").is_none())
                    })
                })
                .count()
        })
        .unwrap_or(0)
}

/// Width and height of a PNG, from its IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let mut head = [0u8; 24];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&head[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&head[16..20]), be(&head[20..24]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_lists_zones_and_ingresses_and_follows_a_zone_going_offline() {
    require_browser_tools();
    let shots = screenshot_dir();
    println!("screenshots of the web UI: {}", shots.display());

    let mut global = Cp::global();
    global.apply(MESH);
    let zone1 = Cp::federated(&global, "zone-1", &[]);
    let mut zone2 = Cp::federated(&global, "zone-2", &[]);
    wait_federated(&zone1);
    wait_federated(&zone2);
    let (port1, port2) = (free_port(), free_port());
    let _ingress1 = start_ingress(&global, &zone1, "zone-1", port1);
    let _ingress2 = start_ingress(&global, &zone2, "zone-2", port2);
    // zone-2: a real app behind a real sidecar. zone-1: a Dataplane applied through the
    // zone's API with no proxy behind it (an offline `web`, still offered by the ingress).
    let echo = Backend::start("echo").await;
    let _echo_dp = start_sidecar(&zone2, "echo-1", "echo", &echo);
    zone1.apply(
        "type: Dataplane\nmesh: default\nname: web-1\nnetworking:\n  address: 127.0.0.1\n  inbound:\n  \
         - port: 1\n    servicePort: 2\n    tags:\n      kuma.io/service: web\n      version: v1\n",
    );
    let expect = json!({"ingresses": [
        {"zone": "zone-1", "advertised": format!("127.0.0.1:{port1}"), "services": ["web"]},
        {"zone": "zone-2", "advertised": format!("127.0.0.1:{port2}"), "services": ["echo"]},
    ]});
    // What the browser must show is first there in the API (so a failure below is the UI's).
    wait_within(SYNC, "both zones Online and both ingresses with their services on global", || {
        let have = ingresses_on(&global);
        let all = expect["ingresses"].as_array().unwrap().iter().all(|e| {
            have.iter().any(|(z, adv, svcs)| {
                z == e["zone"].as_str().unwrap()
                    && adv == e["advertised"].as_str().unwrap()
                    && svcs.iter().any(|s| e["services"][0] == s.as_str())
            })
        });
        (all && zones_online(&global) == 2).then_some(())
    });

    let mut node = Command::new("node")
        .arg("gui.mjs")
        .current_dir(gui_dir())
        .env("GUI_GLOBAL", format!("http://{}", global.api))
        .env("GUI_ZONE", format!("http://{}", zone1.api))
        .env("GUI_SCREENSHOTS", &shots)
        .env("GUI_EXPECT", expect.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start node");
    let mut stdin = node.stdin.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    for (out, prefix) in [
        (Box::new(node.stdout.take().unwrap()) as Box<dyn Read + Send>, ""),
        (Box::new(node.stderr.take().unwrap()), "stderr: "),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(format!("{prefix}{line}"));
            }
        });
    }
    drop(tx);

    let started = Instant::now();
    let mut output = Vec::new();
    loop {
        let left = SCRIPT_LIMIT.saturating_sub(started.elapsed());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = node.kill();
                panic!("the browser test did not finish within {SCRIPT_LIMIT:?}; its output:\n{}", output.join("\n"));
            }
        };
        println!("{line}");
        output.push(line.clone());
        let Some(action) = line.strip_prefix("ACTION ") else { continue };
        match action {
            "kill-zone-2" => zone2.kill(),
            "disable-zone-1" => global.apply("type: Zone\nname: zone-1\nenabled: false\n"),
            "kill-global" => global.kill(),
            other => panic!("the browser test asked for an unknown action {other:?}"),
        }
        writeln!(stdin, "DONE {action}").and_then(|()| stdin.flush()).expect("write to the browser test");
    }
    let status = node.wait().expect("wait for node");
    let output = output.join("\n");
    assert!(status.success(), "the browser test failed ({status}); screenshots in {}:\n{output}", shots.display());
    assert!(output.contains("gui: all checks passed"), "{output}");
    assert!(output.contains("zone-2 Offline on the open page"), "{output}");

    // Acceptance 3: every page at both sizes, really those sizes.
    let pages = ["overview", "zones", "zone", "zone-ingresses", "zone-egresses", "meshes", "services", "dataplanes"];
    for (size, dims) in [("laptop", (1280, 800)), ("phone", (390, 844))] {
        for page in pages {
            let f = shots.join(format!("{size}-{page}.png"));
            assert!(f.exists(), "no screenshot {}", f.display());
            assert_eq!(png_size(&f), dims, "{}", f.display());
        }
    }
    println!("screenshots of the web UI: {}", shots.display());
}
