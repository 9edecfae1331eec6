//! Harness for end-to-end tests: starts the real `dp` binary on loopback with
//! ephemeral ports, plain-TCP and TLS backends that say who they are, and clients that
//! send real ClientHellos.

pub mod envoy;
pub mod hello;
pub mod http;
pub mod mesh;
pub mod netns;
pub mod pair;
pub mod postgres;
pub mod sidecars;
pub mod tls;
pub mod xds;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous bound for anything the tests wait for; a wait that hits it fails the test.
pub const WAIT: Duration = Duration::from_secs(20);

/// Path of a binary of this workspace, built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase());
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe.parent().and_then(Path::parent).expect("target dir").join(name);
    assert!(path.exists(), "{} is missing: build it first with `cargo build --bins` (or set {var})", path.display());
    path
}

/// The repository's `../shared/fixtures` folder (beside the clone).
pub fn fixtures_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/kuma-2.14");
    assert!(
        dir.is_dir(),
        "the Kuma fixtures folder {} is absent: these tests read ../shared/fixtures beside the \
         repository clone",
        dir.display()
    );
    dir
}

/// A number unique within this test process.
pub fn next_id() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A fresh directory for one test's files (configs, certificates, logs). All of them are
/// removed when the test process exits, unless a test in it failed (panicked): then they
/// stay, to be looked at.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("e2e-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    temp_dirs::remove_at_exit(dir.clone());
    dir
}

mod temp_dirs {
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static PANICKED: AtomicBool = AtomicBool::new(false);

    pub fn remove_at_exit(dir: PathBuf) {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                PANICKED.store(true, Ordering::SeqCst);
                report(info)
            }));
            // Rust has no safe exit hook, and a test process has no owner to drop at its end.
            // SAFETY: registers a plain function without arguments, called by exit(3) once the
            // tests have run; it only reads statics and removes directories.
            #[allow(unsafe_code)]
            unsafe {
                libc::atexit(remove_all)
            };
        });
        DIRS.lock().unwrap_or_else(|e| e.into_inner()).push(dir);
    }

    extern "C" fn remove_all() {
        if PANICKED.load(Ordering::SeqCst) {
            return;
        }
        for dir in DIRS.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Log lines of a child process, collected by a thread, with waiting on a pattern.
#[derive(Clone, Default)]
pub struct Logs(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Logs {
    fn follow(&self, r: impl Read + Send + 'static) {
        let logs = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                let (lines, cv) = &*logs.0;
                lines.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.0.lock().unwrap().clone()
    }

    /// Waits for a line containing every one of `parts`, returning it.
    pub fn wait_for(&self, parts: &[&str]) -> String {
        let (lines, cv) = &*self.0;
        let deadline = Instant::now() + WAIT;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(l) = guard.iter().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no log line with {parts:?}; log:\n{}", guard.join("\n"));
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Waits until at least `n` lines contain every one of `parts`.
    pub fn wait_count(&self, parts: &[&str], n: usize) {
        wait_until(&format!("{n} log lines with {parts:?}"), || (self.count(parts) >= n).then_some(()));
    }

    pub fn count(&self, parts: &[&str]) -> usize {
        self.lines().iter().filter(|l| parts.iter().all(|p| l.contains(p))).count()
    }
}

/// A running `dp`.
pub struct Dp {
    pub child: Child,
    pub admin: SocketAddr,
    pub logs: Logs,
    pub dir: PathBuf,
}

impl Dp {
    /// Starts `dp run --xds-file <file> <extra>` and waits until it is ready.
    pub fn start(xds_file: &Path, extra: &[&str]) -> Dp {
        let mut args = vec!["--xds-file", xds_file.to_str().unwrap()];
        args.extend_from_slice(extra);
        let dp = Dp::spawn(&args, &[]);
        dp.wait_ready();
        dp
    }

    /// Starts `dp run --proxy-type=<proxy_type>` against `cp` (its DP server and CA) with
    /// the token and the resource in these files; returns once the admin API answers.
    pub fn against(cp: &Cp, proxy_type: &str, token_file: &Path, resource_file: &Path, env: &[(&str, &str)]) -> Dp {
        let pt = format!("--proxy-type={proxy_type}");
        let cp_address = format!("--cp-address=https://localhost:{}", cp.dp_server.port());
        let args = [
            pt.as_str(),
            &cp_address,
            "--dataplane-token-file",
            token_file.to_str().unwrap(),
            "--ca-cert-file",
            cp.ca_file.to_str().unwrap(),
            "--dataplane-file",
            resource_file.to_str().unwrap(),
        ];
        Dp::spawn(&args, env)
    }

    /// Starts `dp run <args>` with admin and readiness on ephemeral ports; returns once
    /// the admin API answers (not necessarily ready).
    pub fn spawn(extra: &[&str], env: &[(&str, &str)]) -> Dp {
        Dp::spawn_under(&[], "127.0.0.1", extra, env)
    }

    /// [`Dp::spawn`] run by `wrapper` (e.g. `prlimit --nofile=256:256`, or `ip netns exec
    /// <ns>`), which must exec dp in its own process, with the admin API on `admin_ip`.
    pub fn spawn_under(wrapper: &[&str], admin_ip: &str, extra: &[&str], env: &[(&str, &str)]) -> Dp {
        let dir = temp_dir("dp");
        let admin_path = dir.join("admin-address");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--admin-address".into(),
            format!("{admin_ip}:0"),
            "--admin-address-path".into(),
            admin_path.display().to_string(),
            "--readiness-port".into(),
            "0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        // Its work directory (kuma-dp's sockets) inside the test's own, which is removed
        // with it: dp's default, a temporary directory it removes on exit, would be left
        // behind by the kill that ends most tests.
        if !extra.iter().any(|a| a.starts_with("--work-dir"))
            && !env.iter().any(|(k, _)| *k == "KUMA_DATAPLANE_RUNTIME_WORK_DIR")
        {
            args.extend(["--work-dir".to_string(), dir.display().to_string()]);
        }
        let (child, logs) = match wrapper.split_first() {
            None => spawn(&bin("dp"), &args, env),
            Some((program, rest)) => {
                let mut all: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
                all.push(bin("dp").display().to_string());
                all.extend(args);
                spawn(Path::new(program), &all, env)
            }
        };
        let admin = wait_until("dp to write its admin address", || {
            std::fs::read_to_string(&admin_path).ok().and_then(|s| s.trim().parse().ok())
        });
        Dp { child, admin, logs, dir }
    }

    /// Bound address of the only listener.
    pub fn only_listener(&self) -> SocketAddr {
        let (_, body) = self.get("/listeners?format=json");
        let v: serde_json::Value = serde_json::from_str(&body).expect("listeners JSON");
        let all = v["listener_statuses"].as_array().cloned().unwrap_or_default();
        assert_eq!(all.len(), 1, "one listener expected: {body}");
        let sa = &all[0]["local_address"]["socket_address"];
        format!("{}:{}", sa["address"].as_str().unwrap(), sa["port_value"]).parse().unwrap()
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        while http_get(self.admin, "/ready").ok().map(|r| r.0) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "dp not ready within {WAIT:?}; its log:\n{}",
                self.logs.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).unwrap_or_else(|e| panic!("GET {path} on the admin API: {e}"))
    }

    /// Bound address of a listener, from the admin API.
    pub fn listener(&self, name: &str) -> SocketAddr {
        let (_, body) = self.get("/listeners?format=json");
        let v: serde_json::Value = serde_json::from_str(&body).expect("listeners JSON");
        let l = v["listener_statuses"]
            .as_array()
            .and_then(|a| a.iter().find(|l| l["name"] == name))
            .unwrap_or_else(|| panic!("no listener {name} in {body}"));
        let sa = &l["local_address"]["socket_address"];
        format!("{}:{}", sa["address"].as_str().unwrap(), sa["port_value"]).parse().unwrap()
    }

    /// The readiness reporter's address, from the log.
    pub fn readiness(&self) -> SocketAddr {
        let line = self.logs.wait_for(&["readiness reporter listening"]);
        let addr = line.split("address=").nth(1).and_then(|s| s.split_whitespace().next()).expect("address in log");
        addr.parse().expect("readiness address")
    }

    /// Waits until the configuration with `version` is in force.
    /// Waits until the proxy's `cluster` has at least `n` endpoints (hosts in its
    /// `/clusters`). A proxy is ready once it applied its configuration; a server that
    /// became ready just before it joins the client's endpoints only once the control
    /// plane has recorded it serving, which may land after the client's first snapshot.
    pub fn wait_endpoints(&self, cluster: &str, n: usize) {
        let prefix = format!("{cluster}::");
        wait_until(&format!("{n} endpoint(s) of `{cluster}` on dp {}", self.admin), || {
            let (_, body) = self.get("/clusters");
            let hosts = body
                .lines()
                .filter_map(|l| l.strip_prefix(&prefix))
                .filter(|rest| rest.contains("::health_flags::"))
                .count();
            (hosts >= n).then_some(())
        })
    }

    pub fn wait_version(&self, version: &str) {
        wait_until(&format!("config version {version}"), || {
            let (_, body) = http_get(self.admin, "/config_dump").ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["version_info"] == version).then_some(())
        });
    }

    /// Value of a Prometheus sample whose line starts with `prefix`.
    pub fn stat(&self, prefix: &str) -> u64 {
        let (_, body) = self.get("/stats/prometheus");
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no stat {prefix} in:\n{body}"))
    }

    pub fn signal(&self, sig: i32) {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) with our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "dp did not exit; log:\n{}", self.logs.lines().join("\n"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        // A failing test shows what its proxies said too (their connection and config logs).
        if std::thread::panicking() {
            let lines = self.logs.lines();
            let tail = &lines[lines.len().saturating_sub(CP_LOG_TAIL)..];
            eprintln!("---- dp (admin {}) logs, last {} lines ----\n{}", self.admin, tail.len(), tail.join("\n"));
        }
    }
}

/// A running `cp` on ephemeral ports, with its own work dir: a standalone zone, a global
/// control plane, or a zone federated with a global.
pub struct Cp {
    pub child: Child,
    /// DP server (zones; `0.0.0.0:0` on global, which has none).
    pub dp_server: SocketAddr,
    /// KDS server (global only).
    pub kds: Option<SocketAddr>,
    pub api: SocketAddr,
    pub ca_file: PathBuf,
    pub logs: Logs,
    pub dir: PathBuf,
}

impl Cp {
    pub fn start(zone: &str) -> Cp {
        Cp::start_in(temp_dir("cp"), zone, 0)
    }

    /// Starts a standalone zone `cp run` keeping its state in `dir` (a restart reuses it),
    /// with the DP server on `dp_port` (0: any free port).
    pub fn start_in(dir: PathBuf, zone: &str, dp_port: u16) -> Cp {
        Cp::launch(dir, dp_port, 0, &[("KUMA_MULTIZONE_ZONE_NAME", zone)])
    }

    /// Starts a global control plane (`KUMA_MODE=global`), KDS on any free port.
    pub fn global() -> Cp {
        Cp::global_in(temp_dir("global"), 0)
    }

    /// Starts a global control plane in `dir` with KDS on `kds_port` (a restart reuses both).
    pub fn global_in(dir: PathBuf, kds_port: u16) -> Cp {
        Cp::launch(dir, 0, kds_port, &[("KUMA_MODE", "global")])
    }

    /// Starts zone `zone` federated with `global` (trusting its CA).
    pub fn federated(global: &Cp, zone: &str, env: &[(&str, &str)]) -> Cp {
        Cp::federated_via(temp_dir(zone), zone, &global.kds_address(), &global.ca_file, 0, env)
    }

    /// Starts zone `zone` in `dir`, dialing global at `global_address` (`grpcs://...`).
    pub fn federated_via(
        dir: PathBuf,
        zone: &str,
        global_address: &str,
        global_ca: &Path,
        dp_port: u16,
        env: &[(&str, &str)],
    ) -> Cp {
        let ca = global_ca.display().to_string();
        let mut all = vec![
            ("KUMA_MODE", "zone"),
            ("KUMA_MULTIZONE_ZONE_NAME", zone),
            ("KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS", global_address),
            ("KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE", ca.as_str()),
        ];
        all.extend_from_slice(env);
        Cp::launch(dir, dp_port, 0, &all)
    }

    /// Starts `cp run` in `dir` with `env` (mode, zone, `KUMA_STORE_*`, ...), the DP server
    /// on `dp_port` and KDS on `kds_port` (0: any free port).
    pub fn launch_with(dir: PathBuf, dp_port: u16, kds_port: u16, env: &[(&str, &str)]) -> Cp {
        Cp::launch(dir, dp_port, kds_port, env)
    }

    /// `grpcs://localhost:<kds port>` of a global control plane.
    pub fn kds_address(&self) -> String {
        format!("grpcs://localhost:{}", self.kds.expect("a global control plane").port())
    }

    fn launch(dir: PathBuf, dp_port: u16, kds_port: u16, env: &[(&str, &str)]) -> Cp {
        let (dp_port, kds_port) = (dp_port.to_string(), kds_port.to_string());
        let addr_file = dir.join("addresses.json");
        let _ = std::fs::remove_file(&addr_file);
        let args: Vec<String> = [
            "run",
            "--bind-address",
            "127.0.0.1",
            "--dp-server-port",
            &dp_port,
            "--kds-port",
            &kds_port,
            "--api-port",
            "0",
            "--address-file",
            addr_file.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let work = dir.display().to_string();
        let mut all = vec![("KUMA_GENERAL_WORK_DIR", work.as_str()), ("KUMA_XDS_DATAPLANE_DEREGISTRATION_DELAY", "1s")];
        let level = std::env::var("CP_LOG_LEVEL").unwrap_or_else(|_| "info".into());
        all.push(("KUMA_LOG_LEVEL", level.as_str()));
        all.extend_from_slice(env);
        let (child, logs) = spawn(&bin("cp"), &args, &all);
        let v: serde_json::Value = wait_until("cp to write its addresses", || {
            serde_json::from_str(&std::fs::read_to_string(&addr_file).ok()?).ok()
        });
        let addr = |k: &str| v[k].as_str().map(|a| a.parse().unwrap());
        Cp {
            child,
            dp_server: addr("dp_server").unwrap_or_else(|| "0.0.0.0:0".parse().unwrap()),
            kds: addr("kds"),
            api: addr("api").unwrap(),
            ca_file: PathBuf::from(v["ca_cert_file"].as_str().unwrap()),
            logs,
            dir,
        }
    }

    /// Waits until a federated zone has what global gives every zone before its proxies
    /// can connect: the `default` Mesh with its CA, the dataplane-token signing key and the
    /// zone-token public key.
    pub fn wait_federated(&self) {
        wait_within(Duration::from_secs(30), "the mesh, its CA and the signing keys to reach the zone", || {
            let secrets = self.names("/meshes/default/secrets");
            let ok = self.names("/meshes").contains(&"default".to_string())
                && secrets.iter().any(|s| s.contains("ca-builtin-cert"))
                && secrets.iter().any(|s| s.starts_with("dataplane-token-signing-key-default"))
                && self.names("/global-secrets").iter().any(|s| s.starts_with("zone-token-signing-public-key-"));
            ok.then_some(())
        });
    }

    /// `GET <path>` on the REST API as JSON.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = http_get(self.api, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// Names of the items of a REST list.
    pub fn names(&self, path: &str) -> Vec<String> {
        let v = self.get_json(path);
        v["items"]
            .as_array()
            .map(|a| a.iter().filter_map(|i| i["name"].as_str().map(String::from)).collect())
            .unwrap_or_default()
    }

    /// Runs `ctl --api-address <api> <args>`; panics with the output when it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let (status, out) = self.ctl_status(args);
        assert!(status.success(), "ctl {args:?} failed: {out}");
        out
    }

    pub fn ctl_status(&self, args: &[&str]) -> (ExitStatus, String) {
        let api = format!("http://{}", self.api);
        let mut all = vec!["--api-address", api.as_str()];
        all.extend_from_slice(args);
        run(&bin("ctl"), &all, &[])
    }

    /// `ctl apply -f` of a YAML document.
    pub fn apply(&self, yaml: &str) {
        let (status, out) = self.apply_status(yaml);
        assert!(status.success(), "ctl apply failed: {out}");
    }

    /// `ctl apply -f` of a YAML document that must be refused: what `ctl` printed.
    pub fn apply_refused(&self, yaml: &str) -> String {
        let (status, out) = self.apply_status(yaml);
        assert!(!status.success(), "ctl apply took it: {out}");
        out
    }

    fn apply_status(&self, yaml: &str) -> (ExitStatus, String) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = self.dir.join(format!("apply-{n}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        self.ctl_status(&["apply", "-f", f.to_str().unwrap()])
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what its control planes said: a flaky failure may not come
        // back when run again.
        if std::thread::panicking() {
            let lines = self.logs.lines();
            let tail = &lines[lines.len().saturating_sub(CP_LOG_TAIL)..];
            eprintln!("---- cp (REST {}) logs, last {} lines ----\n{}", self.api, tail.len(), tail.join("\n"));
        }
    }
}

/// How many of a control plane's last log lines a failing test prints.
const CP_LOG_TAIL: usize = 200;

/// Starts a binary with stdout and stderr followed into `Logs`.
pub fn spawn(bin: &Path, args: &[String], env: &[(&str, &str)]) -> (Child, Logs) {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let logs = Logs::default();
    logs.follow(child.stdout.take().unwrap());
    logs.follow(child.stderr.take().unwrap());
    (child, logs)
}

/// Runs a binary to completion: (exit status, stdout + stderr).
pub fn run(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status, text)
}

/// Polls `f` until it returns `Some`, failing the test after `WAIT`.
pub fn wait_until<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_within(WAIT, what, f)
}

/// Polls `f` until it returns `Some`, failing the test after `limit`.
pub fn wait_within<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The async [`wait_within`]: polls `f` until it returns `Ok`, failing the test after
/// `limit` with `what` and the last `Err`. For waits on a configuration change that only
/// traffic can show (a proxy lets a connection through, or refuses it, once its new
/// configuration applies).
pub async fn poll_within<T>(limit: Duration, what: &str, mut f: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) => assert!(tokio::time::Instant::now() < deadline, "{what}: {last}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tiny blocking HTTP/1.1 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = StdTcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    Ok((status, if chunked { dechunk(body) } else { body.to_string() }))
}

/// The payload of a chunked HTTP/1.1 body (Envoy's admin answers that way).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// A plain TCP backend standing in for an application behind the ingress. On every
/// connection it answers `<name>\n` as soon as bytes arrive, records what it received
/// and echoes the rest back.
#[derive(Clone)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = Backend { name: name.into(), addr: l.local_addr().unwrap(), received: Default::default() };
        let me = b.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let idx = {
                        let mut r = me.received.lock().unwrap();
                        r.push(vec![]);
                        r.len() - 1
                    };
                    let mut buf = vec![0u8; 16384];
                    let mut greeted = false;
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        me.received.lock().unwrap()[idx].extend_from_slice(&buf[..n]);
                        if !greeted {
                            greeted = true;
                            if s.write_all(format!("{}\n", me.name).as_bytes()).await.is_err() {
                                break;
                            }
                        } else if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        b
    }

    pub fn connections(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

/// Connects to `addr`, sends a ClientHello for `sni`, and returns the first line the
/// backend answers with (its name), or `None` when the proxy closed the connection.
pub async fn who(addr: SocketAddr, sni: Option<&str>) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(&hello::client_hello(sni, &[])).await.ok()?;
    read_line(&mut s).await
}

/// Reads one `\n`-terminated line (without it); `None` on EOF or error first.
pub async fn read_line(s: &mut TcpStream) -> Option<String> {
    let mut line = vec![];
    let mut b = [0u8; 1];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut b)).await.expect("read timed out") {
            Ok(0) | Err(_) => return None,
            Ok(_) if b[0] == b'\n' => return Some(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(b[0]),
        }
    }
}

/// True when the peer closes (EOF or reset) without sending anything.
pub async fn closed_without_data(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(tokio::time::timeout(WAIT, s.read(&mut b)).await.expect("read timed out"), Ok(0) | Err(_))
}
