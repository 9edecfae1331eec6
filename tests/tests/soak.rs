//! Soak and chaos (issue 14, acceptance 5). For `DP_SOAK_SECONDS` (default 120), clients
//! open connections of random size and lifetime through a dp zone-ingress listener
//! (`--xds-file`) while its backends are killed (FIN or RST) and restarted, the
//! configuration is swapped (endpoints, chains and clusters come and go), and clients
//! reset mid-stream, give up mid-ClientHello or send names no chain knows. Then:
//!
//! * nothing panicked and dp is still running;
//! * every connection a client made has exactly one access-log line, matched to it by
//!   the client's address, whose flag is one the client's experience allows (a
//!   connection whose echo came back whole logged `-` with exactly the bytes the client
//!   sent and received), and `downstream_cx_total` = `downstream_cx_destroy` = the number
//!   of connections, with `no_filter_chain_match` and `downstream_listener_filter_error`
//!   equal to the `NR` and `DETECT` lines;
//! * once every connection is closed, dp holds the same sockets and files as after the
//!   warm-up (pipes: only its bounded splice pool), and its RSS is within 10 % of the
//!   warm-up's.
//!
//! `DP_SOAK_SEED` replays a run's choices (the seed is printed); `DP_SOAK_CLIENTS` sets
//! how many clients run at once (default 32); `DP_SOAK_RESETS` the share of connections
//! the client resets mid-stream (percent, default 15; 0 leaves them out). A summary of the run goes to stderr
//! (`cargo test -p e2e --test soak -- --nocapture`).

use e2e::xds::{sni_chain, static_cluster, tls_listener};
use e2e::{Dp, hello, temp_dir, wait_until};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Backends behind the two clusters; each is killed and restarted on its own address.
const BACKENDS: usize = 4;
/// dp's worker threads (`--concurrency`): its splice pipe pool is per worker.
const WORKERS: usize = 2;
/// Idle pipes dp keeps per worker thread for the next spliced connections
/// (`proxy/src/splice.rs`), two descriptors each.
const PIPE_POOL: usize = 64;
/// Longest any one client connection may take; more is a hang, and fails the run.
const CONN_LIMIT: Duration = Duration::from_secs(60);

/// splitmix64: a small seeded generator, so a run's choices can be replayed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    /// 0 one time in ten, else 2^6 .. 2^19 bytes, spread evenly over the exponents.
    fn size(&mut self) -> usize {
        if self.chance(10) {
            return 0;
        }
        let exp = 6 + self.below(14);
        let base = 1usize << exp;
        base + self.below(base as u64) as usize
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Share of connections the client resets mid-stream, in percent (`DP_SOAK_RESETS`,
/// default 15, at most 75): 0 leaves them out, to look at everything else on its own.
fn resets_percent() -> u64 {
    static P: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *P.get_or_init(|| env_u64("DP_SOAK_RESETS", 15).min(75))
}

// ---------------------------------------------------------------------------------------
// Backends that can be killed and restarted.

/// How a backend dies: its listener closes and its connections end with a FIN or an RST.
const LIVE: u8 = 0;
const DIE_FIN: u8 = 1;
const DIE_RST: u8 = 2;

struct Backends {
    addrs: Vec<SocketAddr>,
    /// The kill switch of each running backend.
    running: Mutex<Vec<Option<watch::Sender<u8>>>>,
    kills: AtomicU64,
    restarts: AtomicU64,
}

impl Backends {
    async fn start() -> Arc<Backends> {
        let mut addrs = vec![];
        let mut running = vec![];
        for i in 0..BACKENDS {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(l.local_addr().unwrap());
            running.push(Some(serve_backend(i, l)));
        }
        Arc::new(Backends {
            addrs,
            running: Mutex::new(running),
            kills: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
        })
    }

    fn kill(&self, i: usize, how: u8) {
        if let Some(tx) = self.running.lock().unwrap()[i].take() {
            let _ = tx.send(how);
            self.kills.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Binds the backend's address again (the listener sets SO_REUSEADDR, so the
    /// connections it left in TIME_WAIT do not stand in the way).
    async fn restart(&self, i: usize) {
        if self.running.lock().unwrap()[i].is_some() {
            return;
        }
        match TcpListener::bind(self.addrs[i]).await {
            Ok(l) => {
                self.running.lock().unwrap()[i] = Some(serve_backend(i, l));
                self.restarts.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => eprintln!("soak: backend {i} could not bind {} again yet: {e}", self.addrs[i]),
        }
    }

    async fn restart_all(&self) {
        for i in 0..BACKENDS {
            self.restart(i).await;
        }
    }
}

/// Serves `l` until killed: each connection reads the whole ClientHello record, answers
/// `b<i>\n`, then echoes everything until the client's end of stream.
fn serve_backend(i: usize, l: TcpListener) -> watch::Sender<u8> {
    let (tx, mut rx) = watch::channel(LIVE);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                accepted = l.accept() => {
                    let Ok((s, _)) = accepted else { continue };
                    let kill = rx.clone();
                    tokio::spawn(backend_conn(i, s, kill));
                }
                _ = rx.changed() => return,
            }
        }
    });
    tx
}

async fn backend_conn(i: usize, mut s: TcpStream, mut kill: watch::Receiver<u8>) {
    let echo = async {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await?;
        let mut record = vec![0u8; u16::from_be_bytes([head[3], head[4]]) as usize];
        s.read_exact(&mut record).await?;
        s.write_all(format!("b{i}\n").as_bytes()).await?;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            s.write_all(&buf[..n]).await?;
        }
    };
    let killed = tokio::select! {
        _ = echo => None,
        _ = kill.changed() => Some(*kill.borrow()),
    };
    if killed == Some(DIE_RST) {
        let _ = s.set_zero_linger();
    }
}

// ---------------------------------------------------------------------------------------
// Configuration swaps.

/// The resources of version `v`: clusters `a` and `b` over random subsets of the
/// backends (sometimes none; sometimes `b` is missing altogether), chains for `a` and
/// `b`, and now and then a chain for `extra`.
fn config(rng: &mut Rng, backends: &[SocketAddr]) -> Vec<Value> {
    let mut subset = |empty_percent: u64| -> Vec<SocketAddr> {
        if rng.chance(empty_percent) {
            return vec![];
        }
        let picked: Vec<SocketAddr> = backends.iter().copied().filter(|_| rng.chance(60)).collect();
        if picked.is_empty() { vec![backends[rng.below(backends.len() as u64) as usize]] } else { picked }
    };
    let a = subset(3);
    let b = subset(10);
    let mut resources = vec![static_cluster("a", &a, json!({}))];
    if !rng.chance(10) {
        resources.push(static_cluster("b", &b, json!({})));
    }
    let mut chain_a = sni_chain(&["a"], vec![], "a");
    if rng.chance(50) {
        chain_a["filters"][0]["typedConfig"]["maxConnectAttempts"] = json!(3);
    }
    let mut chains = vec![chain_a, sni_chain(&["b"], vec![], "b")];
    if rng.chance(50) {
        let to = if rng.chance(50) { "a" } else { "b" };
        chains.push(sni_chain(&["extra"], vec![], to));
    }
    resources.push(tls_listener("soak", chains, json!({"listenerFiltersTimeout": "1s"})));
    resources
}

/// Replaces the xDS file in one step (a reader never sees half a file).
fn write_version(path: &Path, version: &str, resources: Vec<Value>) {
    let doc = json!({"version_info": version, "resources": resources});
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------
// Clients.

/// What a client set out to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// ClientHello for the name, wait for the backend's greeting, send `size` bytes in
    /// chunks with pauses while reading the echo, half-close, read to the end.
    Echo,
    /// As `Echo`, but reset (RST) after part of the bytes.
    Reset,
    /// A server name no chain has.
    UnknownName,
    /// Not TLS at all (every chain wants TLS).
    NotTls,
    /// Part of a ClientHello, then a close (FIN, or RST).
    HalfHello,
    /// Part of a ClientHello, then nothing: dp's listener filter timeout (1 s) ends it.
    StalledHello,
}

/// How it went, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// The whole echo came back, then the end of stream.
    Completed,
    /// The client reset the connection mid-stream.
    ClientReset,
    /// Greeted, then the stream ended early (the backend died).
    Cut,
    /// Closed before any answer (no chain, no cluster, no host, connect failure, or the
    /// backend died first).
    NoGreeting,
    /// Closed by dp without data, as planned (NR or DETECT).
    Refused,
    /// dp answered where it should have closed.
    Unexpected,
    /// Nothing happened within `CONN_LIMIT`.
    Stuck,
}

#[derive(Debug, Clone)]
struct ClientRec {
    plan: Plan,
    sni: &'static str,
    outcome: Outcome,
    /// Bytes the client sent and received (checked against the log for `Completed`).
    sent: u64,
    received: u64,
}

/// Everything the clients did, by their local address, in the order the connections
/// ended (a port is reused only once its previous connection is closed on both sides).
#[derive(Default)]
struct Records {
    by_peer: Mutex<HashMap<SocketAddr, Vec<ClientRec>>>,
    connect_failures: AtomicU64,
}

impl Records {
    fn push(&self, peer: SocketAddr, rec: ClientRec) {
        self.by_peer.lock().unwrap().entry(peer).or_default().push(rec);
    }
}

fn pattern(seed: u64, i: usize) -> u8 {
    (seed as usize).wrapping_add(i.wrapping_mul(31)) as u8
}

async fn client_loop(addr: SocketAddr, mut rng: Rng, stop: Arc<AtomicBool>, records: Arc<Records>) {
    while !stop.load(Ordering::Relaxed) {
        one_connection(addr, &mut rng, &records).await;
        // Pacing the load, not synchronisation.
        tokio::time::sleep(rng.millis(0, 20)).await;
    }
}

async fn one_connection(addr: SocketAddr, rng: &mut Rng, records: &Records) {
    let resets = resets_percent();
    let plan = match rng.below(100) {
        p if p < 75 - resets => Plan::Echo,
        0..=74 => Plan::Reset,
        75..=81 => Plan::UnknownName,
        82..=85 => Plan::NotTls,
        86..=94 => Plan::HalfHello,
        _ => Plan::StalledHello,
    };
    let sni = match rng.below(10) {
        0..=5 => "a",
        6..=8 => "b",
        _ => "extra",
    };
    let Ok(mut s) = TcpStream::connect(addr).await else {
        records.connect_failures.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let peer = s.local_addr().unwrap();
    let mut rec = ClientRec { plan, sni, outcome: Outcome::Stuck, sent: 0, received: 0 };
    let mut reset = false;
    let fut = async {
        match plan {
            Plan::Echo | Plan::Reset => echo(&mut s, plan, sni, rng, &mut rec, &mut reset).await,
            Plan::UnknownName | Plan::NotTls => {
                let bytes = if plan == Plan::NotTls {
                    b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n".to_vec()
                } else {
                    hello::client_hello(Some("nobody.example"), &[])
                };
                let _ = s.write_all(&bytes).await;
                rec.sent = bytes.len() as u64;
                refused(&mut s, &mut rec).await;
            }
            Plan::HalfHello | Plan::StalledHello => {
                let bytes = hello::client_hello(Some(sni), &[]);
                let part = 1 + rng.below(bytes.len() as u64 - 2) as usize;
                let _ = s.write_all(&bytes[..part]).await;
                rec.sent = part as u64;
                if plan == Plan::HalfHello {
                    // Give up: a FIN (dp reads the end of stream) or an RST.
                    if rng.chance(50) {
                        reset = true;
                        rec.outcome = Outcome::Refused;
                        return;
                    }
                    let _ = s.shutdown().await;
                }
                refused(&mut s, &mut rec).await;
            }
        }
    };
    if tokio::time::timeout(CONN_LIMIT, fut).await.is_err() {
        rec.outcome = Outcome::Stuck;
    }
    // The record first, then the close: the next connection from this port starts after.
    records.push(peer, rec);
    if reset {
        let _ = s.set_zero_linger();
    }
    drop(s);
}

/// dp must close without sending anything.
async fn refused(s: &mut TcpStream, rec: &mut ClientRec) {
    let mut b = [0u8; 256];
    rec.outcome = match s.read(&mut b).await {
        Ok(0) | Err(_) => Outcome::Refused,
        Ok(n) => {
            rec.received = n as u64;
            Outcome::Unexpected
        }
    };
}

async fn echo(s: &mut TcpStream, plan: Plan, sni: &'static str, rng: &mut Rng, rec: &mut ClientRec, reset: &mut bool) {
    let hello = hello::client_hello(Some(sni), &[]);
    if s.write_all(&hello).await.is_err() {
        rec.outcome = Outcome::NoGreeting;
        return;
    }
    rec.sent = hello.len() as u64;
    // The greeting, `b<i>\n`, byte by byte (it is short).
    let mut greeting = 0u64;
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b).await {
            Ok(1) => {
                greeting += 1;
                if b[0] == b'\n' {
                    break;
                }
            }
            _ => {
                rec.received = greeting;
                rec.outcome = Outcome::NoGreeting;
                return;
            }
        }
    }
    rec.received = greeting;
    let size = rng.size();
    let seed = rng.next();
    // A reset comes after a random part of the bytes.
    let reset_after = if plan == Plan::Reset { rng.below(size as u64 + 1) as usize } else { usize::MAX };
    let chunks: Vec<(usize, Duration)> = {
        let mut v = vec![];
        let mut at = 0;
        let pause_budget = rng.below(1500);
        while at < size {
            let n = (1 + rng.below(16 * 1024) as usize).min(size - at);
            v.push((n, Duration::from_millis(rng.below(pause_budget / 8 + 1))));
            at += n;
        }
        v
    };
    let (mut rd, mut wr) = s.split();
    let sent = AtomicU64::new(0);
    let writer = async {
        let mut at = 0usize;
        for (n, pause) in &chunks {
            if at >= reset_after {
                return true;
            }
            let bytes: Vec<u8> = (at..at + n).map(|i| pattern(seed, i)).collect();
            if wr.write_all(&bytes).await.is_err() {
                return false;
            }
            at += n;
            sent.store(at as u64, Ordering::Relaxed);
            // Pacing: the connection lives a random while.
            tokio::time::sleep(*pause).await;
        }
        if at >= reset_after {
            return true;
        }
        let _ = wr.shutdown().await;
        false
    };
    let reader = async {
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        let mut intact = true;
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return (got, intact, true),
                Ok(n) => {
                    intact &= buf[..n].iter().enumerate().all(|(k, b)| *b == pattern(seed, got + k));
                    got += n;
                }
                Err(_) => return (got, intact, false),
            }
        }
    };
    tokio::pin!(writer);
    tokio::pin!(reader);
    let mut wants_reset = false;
    let (got, intact, eof) = tokio::select! {
        r = &mut reader => r,
        w = &mut writer => {
            wants_reset = w;
            if wants_reset { (0, true, false) } else { reader.await }
        }
    };
    let sent = sent.load(Ordering::Relaxed);
    rec.sent += sent;
    rec.received += got as u64;
    rec.outcome = if wants_reset {
        *reset = true;
        Outcome::ClientReset
    } else if eof && intact && got == size && sent == size as u64 {
        Outcome::Completed
    } else if !intact || got > size {
        Outcome::Unexpected
    } else {
        Outcome::Cut
    };
}

// ---------------------------------------------------------------------------------------
// dp's side: access-log lines, descriptors, memory.

#[derive(Debug, Clone)]
struct LogRec {
    flag: String,
    sent: u64,
    received: u64,
    line: String,
}

/// The value of `key=` in an access-log line (quoted or bare).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    match rest.strip_prefix('"') {
        Some(q) => q.split('"').next(),
        None => rest.split_whitespace().next(),
    }
}

/// dp's access-log lines of the `soak` listener, by peer, in the order written.
fn access_lines(lines: &[String]) -> HashMap<SocketAddr, VecDeque<LogRec>> {
    let mut out: HashMap<SocketAddr, VecDeque<LogRec>> = HashMap::new();
    for l in lines.iter().filter(|l| l.contains(" access: ")) {
        let rest = &l[l.find(" access: ").unwrap()..];
        if field(rest, "listener") != Some("soak") {
            continue;
        }
        let peer: SocketAddr = field(rest, "peer").and_then(|p| p.parse().ok()).expect("peer in an access line");
        let num = |k: &str| field(rest, k).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
        out.entry(peer).or_default().push_back(LogRec {
            flag: field(rest, "flag").unwrap_or("?").to_string(),
            sent: num("sent"),
            received: num("received"),
            line: l.clone(),
        });
    }
    out
}

/// Flags the client's experience allows.
fn allowed(rec: &ClientRec) -> &'static [&'static str] {
    match (rec.outcome, rec.plan) {
        (Outcome::Completed | Outcome::ClientReset | Outcome::Cut, _) => &["-"],
        (Outcome::NoGreeting, _) => match rec.sni {
            "a" => &["-", "UF", "UH"],
            "b" => &["-", "UF", "UH", "NC"],
            _ => &["-", "UF", "UH", "NC", "NR"],
        },
        (Outcome::Refused, Plan::UnknownName | Plan::NotTls) => &["NR"],
        (Outcome::Refused, _) => &["DETECT"],
        (Outcome::Unexpected | Outcome::Stuck, _) => &[],
    }
}

/// dp's descriptors: (sockets and files, pipes), and the listing.
fn descriptors(pid: u32) -> (usize, usize, Vec<String>) {
    let mut others = 0;
    let mut pipes = 0;
    let mut all = vec![];
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let target = std::fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_default();
        if target.starts_with("pipe:") {
            pipes += 1;
        } else {
            others += 1;
        }
        all.push(target);
    }
    all.sort();
    (others, pipes, all)
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Polls `f` every 10 ms for at most `limit`; `None` when it never returned a value.
fn poll_within<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// dp once every client has closed.
struct Quiet {
    /// Downstream connections dp still counts as live 30 s after the last client closed.
    active: u64,
    /// Descriptors other than pipes (sockets, files, epoll, ...), and pipe ends.
    fds: usize,
    pipes: usize,
    list: Vec<String>,
    /// dp's TCP sockets other than listeners, from `ss` (what the live connections hold).
    sockets: Vec<String>,
}

/// Waits (30 s at most) until dp holds no downstream connection, then until its
/// descriptors read the same twice in a row (an admin connection just answered may still
/// be closing).
fn quiet(dp: &Dp) -> Quiet {
    let pid = dp.child.id();
    let active = || dp.stat("envoy_listener_downstream_cx_active{");
    let deadline = Instant::now() + Duration::from_secs(30);
    while active() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut last = descriptors(pid);
    let (fds, pipes, list) = wait_until("dp's descriptors to settle", || {
        let now = descriptors(pid);
        let same = now.2 == last.2;
        last = now;
        same.then(|| last.clone())
    });
    let ss = std::process::Command::new("ss").args(["-tanp"]).output().map(|o| o.stdout).unwrap_or_default();
    let sockets = String::from_utf8_lossy(&ss)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")) && !l.starts_with("LISTEN"))
        .map(|l| l.split_whitespace().take(5).collect::<Vec<_>>().join(" "))
        .collect();
    Quiet { active: active(), fds, pipes, list, sockets }
}

// ---------------------------------------------------------------------------------------

/// One look at dp during the run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: u64,
    rss_kib: u64,
    fds: usize,
    pipes: usize,
    active: u64,
}

struct Shared {
    dp: Arc<Dp>,
    addr: SocketAddr,
    file: PathBuf,
    backends: Arc<Backends>,
    records: Arc<Records>,
    versions: AtomicU64,
    samples: Mutex<Vec<Sample>>,
    started: Instant,
}

/// Runs clients, backend chaos and config swaps for `secs`, then stops them all and
/// brings every backend back.
async fn phase(sh: &Arc<Shared>, rng: &mut Rng, secs: u64, clients: usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        tasks.spawn(client_loop(sh.addr, Rng(rng.next()), stop.clone(), sh.records.clone()));
    }
    // Backends die (FIN or RST) and come back a little later.
    let chaos = {
        let (sh, stop, mut rng) = (sh.clone(), stop.clone(), Rng(rng.next()));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(rng.millis(500, 3000)).await;
                let i = rng.below(BACKENDS as u64) as usize;
                sh.backends.kill(i, if rng.chance(50) { DIE_FIN } else { DIE_RST });
                let (backends, down_for) = (sh.backends.clone(), rng.millis(100, 2500));
                tokio::spawn(async move {
                    tokio::time::sleep(down_for).await;
                    backends.restart(i).await;
                });
            }
        })
    };
    // New versions of the configuration, each waited for (the admin API is blocking).
    let swaps = {
        let (sh, stop, mut rng) = (sh.clone(), stop.clone(), Rng(rng.next()));
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(rng.millis(1000, 4000));
                let v = sh.versions.fetch_add(1, Ordering::Relaxed) + 2;
                write_version(&sh.file, &v.to_string(), config(&mut rng, &sh.backends.addrs));
                sh.dp.wait_version(&v.to_string());
            }
        })
    };
    // RSS, descriptors and live connections every 5 s, for the summary.
    let monitor = {
        let (sh, stop) = (sh.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let pid = sh.dp.child.id();
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    let (others, pipes, _) = descriptors(pid);
                    // A slow admin answer is noted, not fatal: the verdicts come at the end.
                    let active = e2e::http_get(sh.dp.admin, "/stats/prometheus")
                        .ok()
                        .and_then(|(_, body)| {
                            let l = body.lines().find(|l| l.starts_with("envoy_listener_downstream_cx_active{"))?;
                            l.rsplit(' ').next()?.parse().ok()
                        })
                        .unwrap_or(u64::MAX);
                    let t = sh.started.elapsed().as_secs();
                    let s = Sample { secs: t, rss_kib: rss_kib(pid), fds: others, pipes, active };
                    sh.samples.lock().unwrap().push(s);
                    next += Duration::from_secs(5);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = tasks.join_next().await {
        r.expect("a client task panicked");
    }
    chaos.await.unwrap();
    swaps.await.unwrap();
    monitor.await.unwrap();
    sh.backends.restart_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_under_chaos_nothing_leaks_nothing_panics_every_connection_is_accounted_for() {
    let secs = env_u64("DP_SOAK_SECONDS", 120);
    let clients = env_u64("DP_SOAK_CLIENTS", 32) as usize;
    let seed = env_u64(
        "DP_SOAK_SEED",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    );
    eprintln!("soak: {secs} s, {clients} clients, DP_SOAK_SEED={seed}");
    let mut rng = Rng(seed);
    let backends = Backends::start().await;
    let file = temp_dir("soak").join("xds.json");
    write_version(&file, "1", config(&mut rng, &backends.addrs));
    let workers = WORKERS.to_string();
    let dp = Dp::spawn(&["--xds-file", file.to_str().unwrap(), "--concurrency", &workers], &[]);
    dp.wait_ready();
    let addr = dp.listener("soak");
    let pid = dp.child.id();
    eprintln!("soak: dp (pid {pid}) listens on {addr}; backends {:?}", backends.addrs);
    let sh = Arc::new(Shared {
        dp: Arc::new(dp),
        addr,
        file,
        backends,
        records: Arc::default(),
        versions: AtomicU64::new(0),
        samples: Mutex::default(),
        started: Instant::now(),
    });

    // Warm-up: the same load, so that allocator arenas, the pipe pool and the runtime's
    // buffers have grown to their working size before the baseline is taken.
    let warmup = (secs / 10).clamp(10, 120);
    phase(&sh, &mut rng, warmup, clients).await;
    let q0 = quiet(&sh.dp);
    let rss0 = rss_kib(pid);
    eprintln!(
        "soak: after the {warmup} s warm-up: RSS {rss0} KiB, {} sockets/files, {} pipe ends, {} live connections",
        q0.fds, q0.pipes, q0.active
    );

    phase(&sh, &mut rng, secs, clients).await;
    let q1 = quiet(&sh.dp);
    let rss1 = rss_kib(pid);
    let elapsed = sh.started.elapsed();

    // --- The accounts. ---
    let dp = &sh.dp;
    let lines = dp.logs.lines();
    let stat = |name: &str| dp.stat(&format!("envoy_listener_{name}{{"));
    let (total, destroyed) = (stat("downstream_cx_total"), stat("downstream_cx_destroy"));
    let (no_chain, filter_errors) = (stat("no_filter_chain_match"), stat("downstream_listener_filter_error"));
    let mut logged = access_lines(&lines);
    let by_peer = std::mem::take(&mut *sh.records.by_peer.lock().unwrap());
    let recs: Vec<&ClientRec> = by_peer.values().flatten().collect();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    for r in &recs {
        *outcomes.entry(format!("{:?}/{:?}", r.plan, r.outcome)).or_default() += 1;
    }
    let mut flags: BTreeMap<String, u64> = BTreeMap::new();
    for l in logged.values().flatten() {
        *flags.entry(l.flag.clone()).or_default() += 1;
    }
    let log_count: usize = logged.values().map(VecDeque::len).sum();
    let mut problems = vec![];
    // Client connections dp has not logged (still open in dp), by what the client saw.
    let mut unlogged: BTreeMap<String, u64> = BTreeMap::new();
    for (peer, mine) in &by_peer {
        let theirs = logged.remove(peer).unwrap_or_default();
        for c in mine.iter().skip(theirs.len()) {
            *unlogged.entry(format!("{:?}/{:?}", c.plan, c.outcome)).or_default() += 1;
        }
        if theirs.len() != mine.len() {
            problems.push(format!(
                "{peer}: {} connections, {} access-log lines: {mine:?} / {theirs:?}",
                mine.len(),
                theirs.len()
            ));
            continue;
        }
        for (c, l) in mine.iter().zip(&theirs) {
            let ok_flag = allowed(c).contains(&l.flag.as_str());
            let ok_bytes = c.outcome != Outcome::Completed || (l.sent == c.sent && l.received == c.received);
            if !ok_flag || !ok_bytes {
                problems.push(format!("{peer}: client {c:?}, logged: {}", l.line));
            }
        }
    }
    for (peer, theirs) in &logged {
        problems.push(format!("{peer}: access-log lines for no client connection: {theirs:?}"));
    }

    let samples = sh.samples.lock().unwrap().clone();
    let rss_max = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let active_max = samples.iter().map(|s| s.active).max().unwrap_or(0);
    eprintln!(
        "soak: {:.0} s in all ({warmup} s warm-up + {secs} s), {} connections ({:.0}/s), {} config versions, \
         {} backend kills, {} restarts, {} connect failures, at most {active_max} live connections",
        elapsed.as_secs_f64(),
        recs.len(),
        recs.len() as f64 / elapsed.as_secs_f64(),
        sh.versions.load(Ordering::Relaxed),
        sh.backends.kills.load(Ordering::Relaxed),
        sh.backends.restarts.load(Ordering::Relaxed),
        sh.records.connect_failures.load(Ordering::Relaxed),
    );
    eprintln!("soak: client outcomes {outcomes:?}");
    eprintln!("soak: access-log flags {flags:?}");
    eprintln!(
        "soak: dp counted {total} connections, {destroyed} destroyed, {no_chain} without a chain, \
         {filter_errors} listener-filter errors; {log_count} access-log lines"
    );
    eprintln!(
        "soak: once the clients had closed: {} live connections after the warm-up, {} at the end; \
         not logged (still open in dp), by what their client saw: {unlogged:?}",
        q0.active, q1.active
    );
    if q1.active > 0 {
        let upstream = q1.sockets.iter().filter(|l| !l.contains(&addr.to_string())).count();
        eprintln!(
            "soak: dp's TCP sockets at the end ({} downstream, {upstream} upstream), first ones: {:#?}",
            q1.sockets.len() - upstream,
            &q1.sockets[..q1.sockets.len().min(8)]
        );
    }
    eprintln!(
        "soak: descriptors after warm-up {} sockets/files + {} pipe ends, at the end {} + {}; \
         RSS after warm-up {rss0} KiB, at the end {rss1} KiB ({:+.1} %), highest sample {rss_max} KiB",
        q0.fds,
        q0.pipes,
        q1.fds,
        q1.pipes,
        (rss1 as f64 - rss0 as f64) * 100.0 / rss0 as f64
    );
    let step = (samples.len() / 12).max(1);
    for s in samples.iter().step_by(step) {
        eprintln!(
            "soak: t={:>5} s RSS {:>7} KiB, fds {:>4} + {:>3} pipe ends, {:>4} live",
            s.secs, s.rss_kib, s.fds, s.pipes, s.active
        );
    }

    // --- The verdicts. ---
    let panics: Vec<&String> = lines.iter().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "dp panicked:\n{panics:?}");
    assert_eq!(flags.get("INTERNAL"), None, "connections ended by a bug (INTERNAL)");
    let n = recs.len() as u64;
    assert!(
        q0.active == 0 && q1.active == 0,
        "dp still held {} connections after the warm-up and {} at the end, 30 s after every client \
         had closed (by what their client saw: {unlogged:?})",
        q0.active,
        q1.active
    );
    let stuck = recs.iter().filter(|r| matches!(r.outcome, Outcome::Stuck | Outcome::Unexpected)).count();
    assert_eq!(stuck, 0, "connections that hung or got an answer they should not have: {outcomes:?}");
    assert_eq!(sh.records.connect_failures.load(Ordering::Relaxed), 0, "dp refused TCP connections");
    assert!(
        problems.is_empty(),
        "{} connections without their one matching record:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert_eq!(log_count as u64, n, "one access-log line per connection");
    assert_eq!(total, n, "downstream_cx_total");
    assert_eq!(destroyed, n, "downstream_cx_destroy");
    assert_eq!(no_chain, flags.get("NR").copied().unwrap_or(0), "no_filter_chain_match = NR lines");
    assert_eq!(filter_errors, flags.get("DETECT").copied().unwrap_or(0), "listener filter errors = DETECT lines");
    let resets = u64::from(resets_percent() > 0);
    for (what, min) in [("Echo/Completed", 1), ("Reset/ClientReset", resets), ("Echo/Cut", 0)] {
        assert!(outcomes.get(what).copied().unwrap_or(0) >= min, "no {what} at all: {outcomes:?}");
    }
    assert!(sh.backends.kills.load(Ordering::Relaxed) > 0 && sh.versions.load(Ordering::Relaxed) > 0);
    // No growth: a socket still closing when either count was taken (an admin connection
    // just answered) is gone a moment later; a leaked one stays.
    let settled = poll_within(Duration::from_secs(20), || {
        let now = descriptors(pid);
        (now.0 <= q0.fds).then_some(now.0)
    });
    assert!(
        settled.is_some(),
        "sockets and files leaked:\nafter warm-up {:?}\nat the end {:?}",
        q0.list,
        descriptors(pid).2
    );
    assert!(
        q1.pipes <= (2 * PIPE_POOL * WORKERS).max(q0.pipes),
        "{} pipe ends at the end: more than the splice pool holds ({} per worker)",
        q1.pipes,
        2 * PIPE_POOL
    );
    // dp's quiet RSS moves by ~8 MiB with where the allocator's arenas stand (configs
    // are decoded and freed every few seconds): one sample against one sample would be
    // noise. A leak shows as the end exceeding everything seen in the run's first half.
    let first_half = warmup + secs / 2;
    let early = samples.iter().filter(|s| s.secs <= first_half).map(|s| s.rss_kib).max().unwrap_or(0);
    let baseline = rss0.max(early);
    assert!(
        rss1 * 10 <= baseline * 11,
        "RSS grew from {baseline} KiB (the warm-up's, or the first half's highest) to {rss1} KiB (more than 10 %)"
    );
    // dp is still running.
    assert_eq!(sh.dp.get("/ready").0, 200);
}
