//! The real `cp` and `ctl` binaries: start on ephemeral ports, apply, get, tokens, errors.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct CpProc {
    child: Child,
    api: String,
    dir: std::path::PathBuf,
}

impl Drop for CpProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_cp() -> CpProc {
    let dir = std::env::temp_dir().join(format!("cp-cli-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let addr_file = dir.join("addr.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cp"))
        .args(["run", "--bind-address", "127.0.0.1", "--address-file"])
        .arg(&addr_file)
        .env("KUMA_GENERAL_WORK_DIR", dir.join("work"))
        .env("KUMA_MULTIZONE_ZONE_NAME", "zone-1")
        .env("KUMA_DP_SERVER_PORT", "0")
        .env("KUMA_API_SERVER_HTTP_PORT", "0")
        .env("KUMA_LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cp starts");
    // Read the log until the API address line (event-driven: blocks on the pipe).
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("REST API listening") {
                let addr =
                    line.split("address=").nth(1).unwrap_or("").split_whitespace().next().unwrap_or("").to_string();
                let _ = tx.send((addr, line.clone()));
                sent = true;
            }
            if !sent && line.contains("CA certificate") {
                assert!(line.contains("kuma-cp.crt"), "{line}");
            }
        }
    });
    let (api, _) = rx.recv_timeout(Duration::from_secs(30)).expect("cp logs the API address");
    assert!(api.starts_with("127.0.0.1:"), "{api}");
    // The address file is written before the log line is printed.
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&addr_file).unwrap()).unwrap();
    assert_eq!(doc["api"], api.as_str());
    assert!(doc["dp_server"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(std::path::Path::new(doc["ca_cert_file"].as_str().unwrap()).exists());
    CpProc { child, api: format!("http://{api}"), dir }
}

fn ctl(cp: &CpProc, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ctl"));
    cmd.args(args).env("CTL_API_ADDRESS", &cp.api).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn cp_and_ctl_binaries() {
    let cp = start_cp();
    let mesh =
        "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n";
    let (ok, _, err) = ctl(&cp, &["apply", "-f", "-"], Some(mesh));
    assert!(ok, "{err}");
    let dp_file = cp.dir.join("backend-dp.yaml");
    std::fs::write(
        &dp_file,
        "type: Dataplane\nmesh: default\nname: backend-1\nnetworking:\n  address: 127.0.0.1\n  inbound:\n  - port: 18080\n    tags:\n      kuma.io/service: backend\n",
    )
    .unwrap();
    let (ok, _, err) = ctl(&cp, &["apply", "-f", dp_file.to_str().unwrap()], None);
    assert!(ok, "{err}");

    let (ok, out, _) = ctl(&cp, &["get", "meshes"], None);
    assert!(ok);
    assert!(out.lines().next().unwrap().starts_with("NAME"), "{out}");
    assert!(out.contains("default") && out.contains("builtin/ca-1"), "{out}");
    let (ok, out, _) = ctl(&cp, &["get", "dataplanes", "-o", "json"], None);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"], 1);
    let (ok, out, _) = ctl(&cp, &["get", "dataplane", "backend-1", "-o", "yaml"], None);
    assert!(ok && out.contains("kuma.io/service: backend"), "{out}");

    // Service insights are computed in the background (as Kuma's): wait for the row.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let out = loop {
        let (ok, out, _) = ctl(&cp, &["inspect", "services"], None);
        assert!(ok);
        if out.contains("backend") || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        out.contains("SERVICE") && out.contains("backend") && out.contains("Offline") && out.contains("0/1"),
        "{out}"
    );

    let (ok, out, err) =
        ctl(&cp, &["generate", "zone-token", "--zone", "zone-1", "--scope", "ingress", "--scope", "egress"], None);
    assert!(ok, "{err}");
    assert_eq!(out.trim().split('.').count(), 3, "{out}");

    let (ok, _, err) = ctl(&cp, &["apply", "-f", "-"], Some("type: Zone\nname: zone-2\nenabled: false\n"));
    assert!(ok, "{err}");
    let (ok, out, _) = ctl(&cp, &["get", "zones"], None);
    assert!(ok && out.contains("zone-2") && out.contains("Disabled"), "{out}");
    let (ok, out, _) = ctl(&cp, &["delete", "zone", "zone-2"], None);
    assert!(ok && out.contains("deleted Zone"), "{out}");

    // Errors: non-zero exit, one line naming the problem.
    let (ok, _, err) =
        ctl(&cp, &["apply", "-f", "-"], Some("type: Dataplane\nname: bad\nnetworking:\n  address: ''\n"));
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("422") && err.contains("networking.address"), "{err}");
    let (ok, _, err) = ctl(&cp, &["delete", "zone", "nope"], None);
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, _, err) = ctl(&cp, &["generate", "zone-token", "--zone", "z", "--scope", "sideways"], None);
    assert!(!ok && err.contains("scope"), "{err}");
    let (ok, _, err) = ctl(&cp, &["get", "frobs"], None);
    assert!(!ok && err.contains("unknown resource kind"), "{err}");
    let (ok, _, err) = ctl(&cp, &["apply", "-f", "/nonexistent.yaml"], None);
    assert!(!ok && err.contains("/nonexistent.yaml"), "{err}");
}
