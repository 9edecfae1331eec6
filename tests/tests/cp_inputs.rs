//! `dp run` against a control plane refuses bad input with one clear line and a
//! non-zero exit, before or while bootstrapping.

use e2e::{bin, run, temp_dir};
use std::path::PathBuf;

const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEiLCJ0eXAiOiJKV1QifQ.eyJab25lIjoiem9uZS0xIn0.c2ln";
const INGRESS: &str = "type: ZoneIngress\nname: ingress-01\nnetworking:\n  address: 127.0.0.1\n  port: 10000\n";

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new() -> Self {
        let dir = temp_dir("inputs");
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
        std::fs::write(dir.join("ingress.yaml"), INGRESS).unwrap();
        Files { dir }
    }
    fn path(&self, name: &str, content: Option<&str>) -> String {
        let p = self.dir.join(name);
        if let Some(c) = content {
            std::fs::write(&p, c).unwrap();
        }
        p.display().to_string()
    }
}

fn dp(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["run", "--admin-address", "127.0.0.1:0", "--readiness-port", "0"];
    all.extend_from_slice(args);
    let (status, out) = run(&bin("dp"), &all, env);
    assert!(!status.success(), "{args:?} must fail:\n{out}");
    let last = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
    assert!(last.starts_with("dp: "), "the last line is the error: {out}");
    last
}

#[test]
fn each_bad_input_gets_its_own_sentence() {
    let f = Files::new();
    let token = f.path("token", None);
    let ingress = f.path("ingress.yaml", None);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--dataplane-token-file".into(), f.path("missing", None)], "--dataplane-token-file"),
        (vec!["--dataplane-token-file".into(), f.path("bad-token", Some("hello"))], "not a JWT"),
        (vec!["--dataplane-token-file".into(), f.path("empty-token", Some("\n"))], "the token is empty"),
        (
            vec!["--dataplane-file".into(), f.path("egress.yaml", Some("type: ZoneEgress\nname: e\n"))],
            "does not match --proxy-type=ingress",
        ),
        (
            vec!["--dataplane-file".into(), f.path("broken.yaml", Some("type: [ZoneIngress\n"))],
            "not valid YAML or JSON",
        ),
        (vec!["--ca-cert-file".into(), f.path("ca.pem", Some("not a certificate"))], "no PEM certificate"),
        (vec!["--cp-address".into(), "cp:5678".into()], "must start with https:// or http://"),
        (
            vec!["--dataplane-file".into(), ingress.clone(), "--name".into(), "x".into()],
            "--name and --mesh must not be set",
        ),
    ];
    for (extra, want) in cases {
        let mut args: Vec<&str> = vec![
            "--proxy-type=ingress",
            "--cp-address=https://127.0.0.1:1",
            "--dataplane-token-file",
            &token,
            "--dataplane-file",
            &ingress,
        ];
        args.extend(extra.iter().map(String::as_str));
        let line = dp(&args, &[]);
        assert!(line.contains(want), "{extra:?}: want {want:?} in {line:?}");
    }
}

#[test]
fn a_bad_token_is_reported_before_a_busy_port() {
    let f = Files::new();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let args = [
        "run",
        "--admin-address",
        "127.0.0.1:0",
        "--readiness-port",
        &port,
        "--proxy-type=ingress",
        "--cp-address=https://127.0.0.1:1",
        "--dataplane-token-file",
        &f.path("bad-token", Some("hello")),
        "--dataplane-file",
        &f.path("ingress.yaml", None),
    ];
    let (status, out) = run(&bin("dp"), &args, &[]);
    assert!(!status.success());
    assert!(out.contains("not a JWT") && !out.contains("cannot bind"), "{out}");
}

#[test]
fn an_unreachable_control_plane_is_named_after_the_retries() {
    let f = Files::new();
    let (token, ingress) = (f.path("token", None), f.path("ingress.yaml", None));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cp = format!("--cp-address=https://127.0.0.1:{port}");
    let env = [("KUMA_CONTROL_PLANE_RETRY_BACKOFF", "50ms"), ("KUMA_CONTROL_PLANE_RETRY_MAX_DURATION", "300ms")];
    let line = dp(&["--proxy-type=ingress", &cp, "--dataplane-token-file", &token, "--dataplane-file", &ingress], &env);
    assert!(line.contains(&format!("cannot reach the control plane at https://127.0.0.1:{port}")), "{line}");
    assert!(line.contains("gave up after"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_file_is_named() {
    let f = Files::new();
    let (token, ingress) = (f.path("token", None), f.path("ingress.yaml", None));
    // A TLS server whose certificate the given CA did not sign.
    let (server, _) = e2e::tls::pair("localhost");
    let addr = e2e::tls::serve(server, "cp").await;
    let other = rcgen::generate_simple_self_signed(vec!["other".into()]).unwrap();
    let ca = f.path("other-ca.pem", Some(&other.cert.pem()));
    let cp = format!("--cp-address=https://localhost:{}", addr.port());
    let env = [("KUMA_CONTROL_PLANE_RETRY_BACKOFF", "50ms"), ("KUMA_CONTROL_PLANE_RETRY_MAX_DURATION", "300ms")];
    let args = [
        "--proxy-type=ingress",
        &cp,
        "--dataplane-token-file",
        &token,
        "--dataplane-file",
        &ingress,
        "--ca-cert-file",
        &ca,
    ];
    let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let line = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        dp(&args, &env)
    })
    .await
    .unwrap();
    assert!(line.contains("TLS handshake failed") && line.contains("--ca-cert-file"), "{line}");
}
