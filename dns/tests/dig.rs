//! Interop: the system `dig` (package dnsutils; scripts/setup.sh installs it) against `dns::serve`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Runs `dig @127.0.0.1 -p PORT ARGS...` and returns its stdout.
async fn dig(port: u16, args: &[&str]) -> String {
    let mut cmd = Command::new("dig");
    cmd.args(["@127.0.0.1", "-p", &port.to_string(), "+time=3", "+tries=1"]).args(args);
    let shown = format!("{cmd:?}");
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap_or_else(|e| {
        panic!("cannot run `dig` ({e}): install it with `apt-get install dnsutils` (scripts/setup.sh does)")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{shown} failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn status(out: &str) -> &str {
    out.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("<no status>")
}

#[tokio::test]
async fn dig_against_the_server() {
    let up = FakeUpstream::start(Duration::ZERO).await;
    let s = start_server(vec![up.addr], dns::Limits::default()).await;
    let port = s.addr.port();

    let out = dig(port, &["+short", "echo-server_echo-example_svc_1010.mesh", "A"]).await;
    assert_eq!(out.trim(), "240.0.0.1", "underscore name");
    let out = dig(port, &["+short", "echo-server.echo-example.svc.1010.mesh", "A"]).await;
    assert_eq!(out.trim(), "240.0.0.1", "RFC 1123 dotted alias");

    let out = dig(port, &["+noall", "+answer", "Echo-Server.Echo-Example.SVC.1010.MESH", "A"]).await;
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words, ["Echo-Server.Echo-Example.SVC.1010.MESH.", "30", "IN", "A", "240.0.0.1"], "mixed case echoed");

    let out = dig(port, &["echo-server.echo-example.svc.1010.mesh", "AAAA"]).await;
    assert_eq!(status(&out), "NOERROR", "AAAA NODATA: {out}");
    assert!(out.contains("ANSWER: 0,") && out.contains(" aa "), "AAAA NODATA: {out}");

    let out = dig(port, &["nope.mesh", "A"]).await;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");

    let out = dig(port, &["+ignore", "+noedns", "many.mesh", "A"]).await;
    assert!(out.contains(" tc ") && out.contains("ANSWER: 0,"), "UDP truncates 100 records: {out}");
    let out = dig(port, &["+tcp", "+short", "many.mesh", "A"]).await;
    assert_eq!(out.lines().count(), 100, "+tcp gets all 100 records: {out}");
    assert!(out.lines().any(|l| l == "240.0.1.99"));

    let out = dig(port, &["+short", "example.org", "A"]).await;
    assert_eq!(out.trim(), EXAMPLE_IP.to_string(), "forwarded to the fake upstream");
    let out = dig(port, &["+tcp", "+short", "example.org", "A"]).await;
    assert_eq!(out.trim(), EXAMPLE_IP.to_string(), "forwarded over TCP");
    let out = dig(port, &["missing.example", "A"]).await;
    assert_eq!(status(&out), "NXDOMAIN", "upstream NXDOMAIN passed through: {out}");
}
