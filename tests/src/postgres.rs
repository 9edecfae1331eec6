//! A throwaway PostgreSQL server for the tests: Debian's `postgresql` package
//! (`/usr/lib/postgresql/<version>/bin`), `initdb` into a temporary directory, run as an
//! unprivileged user (PostgreSQL refuses root), on a free port, with password
//! authentication over TCP as cp uses it; stopped and deleted on drop.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Logs, temp_dir, wait_within};

pub const USER: &str = "kuma";
pub const PASSWORD: &str = "kuma-test-password";

/// The newest installed PostgreSQL's `bin` directory, or a panic that says what to install.
pub fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed: these tests start a throwaway server with Debian's `postgresql` \
             package (/usr/lib/postgresql/<version>/bin/initdb and postgres); run scripts/setup.sh, or \
             `apt-get install postgresql`"
        )
    })
}

/// uid and gid to run the server as: ours, or `nobody`'s when we are root.
fn server_user() -> Option<(u32, u32)> {
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    if me != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let line = passwd.lines().find(|l| l.starts_with("nobody:")).expect("a `nobody` user to run PostgreSQL as");
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().unwrap(), f[3].parse().unwrap()))
}

fn as_server_user(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
}

fn chown(path: &Path, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// A running throwaway server.
pub struct Postgres {
    child: Child,
    pub port: u16,
    pub logs: Logs,
    /// With TLS: the server's (self-signed) certificate, for `KUMA_STORE_POSTGRES_TLS_CA_PATH`.
    pub ca_file: Option<PathBuf>,
    bin: PathBuf,
    dir: PathBuf,
}

impl Postgres {
    /// initdb + postgres on a free port; returns once it accepts connections.
    pub fn start() -> Postgres {
        Postgres::launch(false)
    }

    /// As [`Postgres::start`], also accepting TLS with a certificate for `localhost` and
    /// `127.0.0.1` ([`Postgres::ca_file`]).
    pub fn start_tls() -> Postgres {
        Postgres::launch(true)
    }

    fn launch(tls: bool) -> Postgres {
        let bin = bin_dir();
        let user = server_user();
        let dir = temp_dir("pg");
        let data = dir.join("data");
        std::fs::create_dir(&data).unwrap();
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        for p in [&dir, &data, &pwfile] {
            chown(p, user);
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D", data.to_str().unwrap(), "-U", USER, "--pwfile", pwfile.to_str().unwrap()])
            .args(["--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .current_dir(&dir)
            .env("LC_ALL", "C");
        as_server_user(&mut initdb, user);
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ca_file = tls.then(|| {
            let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("a server certificate");
            let (crt, key) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::write(&crt, cert.cert.pem()).unwrap();
            std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            chown(&crt, user);
            chown(&key, user);
            crt
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut cmd = Command::new(bin.join("postgres"));
        if let Some(crt) = &ca_file {
            cmd.args(["-c", "ssl=on", "-c"])
                .arg(format!("ssl_cert_file={}", crt.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", dir.join("server.key").display()));
        }
        cmd.args(["-D", data.to_str().unwrap(), "-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={}", dir.display()))
            // Throwaway data: no fsync; room for several control planes' pools.
            .args(["-c", "fsync=off", "-c", "max_connections=300", "-c", "shared_buffers=32MB"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        as_server_user(&mut cmd, user);
        let mut child = cmd.spawn().expect("start postgres");
        let logs = Logs::default();
        logs.follow(child.stdout.take().unwrap());
        logs.follow(child.stderr.take().unwrap());
        let mut pg = Postgres { child, port, logs, ca_file, bin, dir };
        pg.wait_ready();
        pg
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Polls a real connection (`pg_isready`) until the server accepts it.
    fn wait_ready(&mut self) {
        let (bin, port, logs) = (self.bin.clone(), self.port, self.logs.clone());
        let child = &mut self.child;
        wait_within(Duration::from_secs(30), "PostgreSQL to accept connections", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("PostgreSQL exited ({status}):\n{}", logs.lines().join("\n"));
            }
            let st = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER, "-d", "postgres"])
                .status()
                .ok()?;
            st.success().then_some(())
        });
    }

    /// Runs SQL with `psql` against `db` (through `port`: the server's own or a relay to
    /// it); returns the unaligned output, or the error text.
    pub fn try_psql_via(&self, port: u16, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", USER, "-d", db, "-c", sql])
            .env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .expect("run psql");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() { Ok(text.trim().to_string()) } else { Err(text) }
    }

    /// Runs SQL against `db`; panics with psql's output when it fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql_via(self.port, db, sql).unwrap_or_else(|e| panic!("psql {sql:?} on {db}: {e}"))
    }

    /// A new, empty database.
    pub fn create_db(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
    }

    /// cp's `KUMA_STORE_*` for database `db` reached at `port` (the server's, or a relay's).
    /// The connection timeout is Kuma's default doubled: a debug build's SCRAM login costs
    /// tens of milliseconds of CPU, and a burst of writes opens a pool's worth of
    /// connections at once on a machine other builds share.
    pub fn store_env(&self, db: &str, port: u16) -> Vec<(String, String)> {
        [
            ("KUMA_STORE_TYPE", "postgres".to_string()),
            ("KUMA_STORE_POSTGRES_HOST", "127.0.0.1".to_string()),
            ("KUMA_STORE_POSTGRES_PORT", port.to_string()),
            ("KUMA_STORE_POSTGRES_USER", USER.to_string()),
            ("KUMA_STORE_POSTGRES_PASSWORD", PASSWORD.to_string()),
            ("KUMA_STORE_POSTGRES_DB_NAME", db.to_string()),
            ("KUMA_STORE_POSTGRES_TLS_MODE", "disable".to_string()),
            ("KUMA_STORE_POSTGRES_CONNECTION_TIMEOUT", "10".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown (its backends go with it).
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
