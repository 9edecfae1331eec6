//! Wiring of `dp run`: admin and readiness servers, the configuration source, signal
//! handling and drain.

use crate::admin::{self, Admin};
use crate::cli::RunArgs;
use crate::conn::Ctx;
use crate::dns_proxy::DnsProxy;
use crate::drain::Drain;
use crate::listeners::Listeners;
use crate::resources::{MAX_FILE_BYTES, Resources};
use crate::snapshot::{self, DnsAnswers, Snapshot};
use crate::stats::Registry;
use crate::telemetry::LogLevel;
use anyhow::Context;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::google::protobuf::Any;
use std::collections::HashSet;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

/// How often the xDS file is checked for changes where inotify is unavailable.
const FILE_POLL: Duration = Duration::from_millis(200);
/// How often it is checked anyway when inotify reports changes.
const FILE_SAFETY_POLL: Duration = Duration::from_secs(2);

/// The next time to look at the file: an inotify event in its directory, or the poll.
async fn file_changed(tick: &mut tokio::time::Interval, events: Option<&crate::file_watch::DirEvents>) {
    match events {
        Some(e) => tokio::select! {
            _ = tick.tick() => {}
            r = e.changed() => {
                if let Err(err) = r {
                    debug!(error = %err, "reading inotify events failed; the poll goes on");
                    tick.tick().await;
                }
            }
        },
        None => {
            tick.tick().await;
        }
    }
}
/// A file that fails to decode and was modified less than this long ago is taken to be
/// still being written: it is read again, not rejected.
const FILE_SETTLE: Duration = Duration::from_millis(1000);
/// How often STRICT_DNS names are resolved again.
const DNS_REFRESH: Duration = Duration::from_secs(5);

/// Applies configuration versions: build, bind new listeners, publish, start them.
pub struct Applier {
    ctx: Arc<Ctx>,
    listeners: Arc<Mutex<Listeners>>,
    /// Ignored-field notes already logged, so each is said once.
    noted: HashSet<String>,
    /// `--dns-enabled`: serve the configuration's DNS listeners.
    dns_enabled: bool,
    /// The embedded DNS proxy (`--dns-proxy-port`), fed the dynamic-config records.
    dns_proxy: Option<Arc<DnsProxy>>,
    /// The runtime that serves connections. The applier may run elsewhere (ADS runs on a
    /// thread of its own, so that building a large configuration never stalls traffic);
    /// what it starts (listeners, health checks) and the sockets it binds belong here.
    data: tokio::runtime::Handle,
}

impl Applier {
    /// Takes the resources by value: they are dropped before the freed memory is
    /// returned to the OS.
    pub fn apply(&mut self, mut resources: Resources, dns: &DnsAnswers) -> Result<(), String> {
        let _data = self.data.enter();
        let mut notes = vec![];
        let encoded = Arc::new(resources.take_encoded());
        let previous = self.ctx.routes.load_full();
        let mut snap = snapshot::build_with(&resources, Some(&previous), encoded, dns, &self.ctx.stats, &mut notes)?;
        drop(previous);
        drop(resources);
        if !self.dns_enabled && !snap.dns.is_empty() {
            notes.push("DNS listeners are not served: --dns-enabled=false".into());
            snap.dns.clear();
        }
        let embedded_dns = snap.embedded_dns.clone();
        if embedded_dns.is_some() && self.dns_proxy.is_none() {
            notes.push(
                "the dynamic-config DNS records are not served: the DNS proxy is off (--dns-proxy-port 0)".into(),
            );
        }
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let prepared = listeners.prepare(&snap)?;
        for n in notes {
            if self.noted.insert(n.clone()) {
                warn!("{n}");
            }
        }
        let (version, n_listeners, n_clusters) = (snap.version.clone(), snap.listeners.len(), snap.clusters.len());
        crate::health::start(&snap);
        let snap = Arc::new(snap);
        let old = self.ctx.routes.swap(snap.clone());
        retire(old, &snap);
        listeners.commit(prepared, &self.ctx);
        if let (Some(proxy), Some(table)) = (&self.dns_proxy, embedded_dns) {
            proxy.update(table);
        }
        self.ctx.stats.global.config_update_success.inc();
        info!(version = %version, listeners = n_listeners, clusters = n_clusters, "configuration applied");
        release_freed_memory();
        Ok(())
    }
}

impl Applier {
    /// An applier for `ctx` with no DNS, as a unit test drives it.
    #[cfg(test)]
    pub(crate) fn for_test(ctx: Arc<Ctx>) -> Applier {
        Applier {
            ctx,
            listeners: Arc::new(Mutex::new(Listeners::default())),
            noted: HashSet::new(),
            dns_enabled: false,
            dns_proxy: None,
            data: tokio::runtime::Handle::current(),
        }
    }

    /// Where the running listener `name` is bound.
    #[cfg(test)]
    pub(crate) fn bound_for_test(&self, name: &str) -> SocketAddr {
        let l = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        l.bound().into_iter().find(|(n, _)| n == name).map(|(_, a)| a).expect("the listener runs")
    }

    /// Applies an update of ClusterLoadAssignments alone, in place: each EDS cluster that
    /// uses one gets new hosts ([`ClusterCfg::publish`]), and nothing else is rebuilt (the
    /// other clusters and every listener stay the same objects). Connections see the new
    /// hosts from their next pick; one that already picked keeps its host.
    ///
    /// `Ok(false)`: this update cannot be applied in place (an assignment the current
    /// configuration does not hold where it could be replaced); build it whole instead.
    /// `Err`: refused, as a whole build would refuse it; nothing changed.
    ///
    /// [`ClusterCfg::publish`]: crate::snapshot::cluster::ClusterCfg::publish
    pub fn apply_endpoints(
        &mut self,
        updates: Vec<(String, Any, ClusterLoadAssignment)>,
        version: String,
    ) -> Result<bool, String> {
        let _data = self.data.enter();
        let current = self.ctx.routes.load_full();
        let Some(encoded) =
            current.resources.with_endpoints(version.clone(), updates.iter().map(|(n, a, _)| (n.clone(), a.clone())))
        else {
            return Ok(false);
        };
        // Build every new host set before publishing any: a refusal changes nothing.
        let mut fresh = vec![];
        for (name, _, cla) in &updates {
            for c in current.eds_clusters.get(name).into_iter().flatten() {
                fresh.push((c.clone(), Arc::new(snapshot::eds_hosts(c, cla, &self.ctx.stats)?)));
            }
        }
        for (c, hosts) in &fresh {
            c.publish(hosts.clone());
            if let Some(cfg) = &c.health_check {
                crate::health::start_cluster(c, cfg);
            }
        }
        let snap = Snapshot {
            version: version.clone(),
            resources: Arc::new(encoded),
            listeners: current.listeners.clone(),
            dns: current.dns.clone(),
            embedded_dns: current.embedded_dns.clone(),
            mesh_metric: current.mesh_metric.clone(),
            clusters: current.clusters.clone(),
            eds_clusters: current.eds_clusters.clone(),
            unbound: current.unbound.clone(),
        };
        let snap = Arc::new(snap);
        let old = self.ctx.routes.swap(snap.clone());
        retire(old, &snap);
        self.ctx.stats.global.config_update_success.inc();
        info!(version = %version, assignments = updates.len(), clusters = fresh.len(), "endpoints updated in place");
        Ok(true)
    }
}

/// Hands a replaced snapshot, and each of its listeners the new one does not share, to
/// the reaper: connections still hold them, and the last one to end must not free a
/// large configuration on a data-path worker.
fn retire(old: Arc<Snapshot>, new: &Snapshot) {
    for (name, l) in old.listeners.iter() {
        if !new.listeners.get(name).is_some_and(|n| Arc::ptr_eq(n, l)) {
            crate::reaper::later(l.clone());
        }
    }
    crate::reaper::later(old);
}

/// Runs `job`, the configuration source (ADS or the file watcher), on a thread and
/// runtime of its own (as ztunnel does): decoding and building a large configuration
/// takes a core for a while and must not take it from the connections the data-path
/// runtime serves. The thread also yields the CPU to the data path when both want it
/// ([`yield_to_the_data_path`]). The [`Applier`] enters the data-path runtime for what
/// it binds and starts.
pub fn spawn_config_thread(name: &str, job: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            yield_to_the_data_path();
            let _span = span.entered();
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(job),
                Err(e) => error!("the configuration source cannot start its runtime: {e}"),
            }
        })
        .with_context(|| format!("cannot start the {name} thread"))?;
    Ok(())
}

/// The nice value of dp's background threads (configuration, reaper). With 10, the
/// scheduler gives a data-path worker about nine tenths of a CPU they both want, so a
/// storm of large updates slows the updates rather than the connections being set up.
/// Updates still get about a tenth of a saturated CPU: they are slowed, never stopped.
/// (benches/storm.py on one CPU adds 0.02 ms to the p99 with it; `SCHED_IDLE` and a 100 µs
/// EEVDF slice measured the same. The larger gain once cited here was measured while the
/// bench itself stalled its client; see benches/RESULTS.md, section 7.)
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority to [`BACKGROUND_NICE`] (on Linux the
/// nice value is per thread). Best effort: where it is refused, the thread runs as is.
#[allow(unsafe_code)]
pub fn yield_to_the_data_path() {
    // SAFETY: setpriority has no pointer arguments; PRIO_PROCESS with who 0 is the
    // calling thread on Linux.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICE);
    }
}

/// How long readiness waits for the DNS proxy's first records (kuma-dp's gate bypass:
/// a control plane that sends none must not keep the proxy unready forever).
const DNS_READY_GATE: Duration = Duration::from_secs(15);

/// Marks the proxy ready after `applied`, and, with the DNS proxy on, after its first
/// records or `DNS_READY_GATE`, whichever comes first.
async fn ready_when(
    drain: Arc<Drain>,
    dns_configured: Option<tokio::sync::watch::Receiver<bool>>,
    applied: impl Future,
) {
    applied.await;
    if let Some(mut configured) = dns_configured {
        let got = tokio::time::timeout(DNS_READY_GATE, configured.wait_for(|c| *c)).await;
        if !matches!(got, Ok(Ok(_))) {
            warn!(gate = ?DNS_READY_GATE, "the DNS proxy has no records from the control plane yet; ready anyway");
        }
    }
    info!("ready");
    drain.set_ready();
}

/// Decoding and building a configuration allocates far more than the snapshot keeps
/// (the descriptor pool alone is tens of MiB); give the freed pages back to the OS so
/// the idle RSS is what the snapshot really needs.
#[allow(unsafe_code)]
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap structures.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Where the configuration comes from, read and checked. One value per process: the
/// variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Source {
    File(FileSource, Resources, DnsAnswers),
    Cp(crate::cp_inputs::CpInputs),
}

pub async fn run(args: RunArgs, log_level: LogLevel) -> anyhow::Result<()> {
    // Before anything listens or says ready: a SIGTERM that arrives before its handler is
    // installed kills the process at once, skipping the drain (a test that stopped dp right
    // after it was ready saw exactly that, under load).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stats = Arc::new(Registry::default());
    stats.global.server_live.set(1);
    // The log writer's drops, as a stat (`envoy_log_lines_dropped`).
    let (dropped_stats, dropped_level) = (stats.clone(), log_level.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            dropped_stats.global.log_lines_dropped.set(dropped_level.dropped_lines());
        }
    });
    let drain = Drain::new();
    let ctx = Ctx::new(stats, drain.clone());
    ctx.max_connections.store(args.global_downstream_max_connections, std::sync::atomic::Ordering::Relaxed);
    let listeners = Arc::new(Mutex::new(Listeners::default()));
    let quit = Arc::new(Notify::new());

    // Every input is read and checked before anything is bound: a bad token or file is
    // reported as such, not hidden behind a busy port.
    let source = match args.xds_file.clone() {
        Some(path) => {
            let mut source = FileSource::new(path);
            let (resources, dns) = source.load().await.map_err(anyhow::Error::msg)?;
            Source::File(source, resources, dns)
        }
        None => Source::Cp(crate::cp_inputs::CpInputs::from_args(&args).map_err(anyhow::Error::msg)?),
    };
    let admin_listener = admin::bind("admin API", args.admin_address).await?;
    let admin_addr = admin_listener.local_addr()?;
    if let Some(p) = &args.admin_address_path {
        std::fs::write(p, admin_addr.to_string())
            .with_context(|| format!("cannot write --admin-address-path {}", p.display()))?;
    }
    let readiness_addr = SocketAddr::new(args.admin_address.ip(), args.readiness_port);
    let readiness_listener = admin::bind("readiness reporter (KUMA_READINESS_PORT)", readiness_addr).await?;
    info!(address = %admin_addr, "admin API listening");
    info!(address = %readiness_listener.local_addr()?, "readiness reporter listening");
    let admin = Admin { ctx: ctx.clone(), listeners: listeners.clone(), log_level, quit: quit.clone() };
    tokio::spawn(admin::serve(admin_listener, move |req| admin.handle(req)));
    let rctx = ctx.clone();
    tokio::spawn(admin::serve(readiness_listener, move |req| admin::readiness(&rctx, &req)));

    let dns_proxy = if args.embedded_dns() {
        Some(Arc::new(DnsProxy::start(args.dns_proxy_port, args.transparent_proxy)?))
    } else {
        None
    };
    let dns_configured = dns_proxy.as_ref().map(|p| p.configured());
    let mut applier = Applier {
        ctx: ctx.clone(),
        listeners: listeners.clone(),
        noted: HashSet::new(),
        dns_enabled: args.dns_enabled,
        dns_proxy,
        data: tokio::runtime::Handle::current(),
    };
    // Removed (when dp made it) once dp is done.
    let mut work_dir = None;
    match source {
        Source::File(source, resources, dns) => {
            let names = snapshot::dns_names(&resources);
            applier.apply(resources, &dns).map_err(|e| anyhow::anyhow!("--xds-file {}: {e}", source.path.display()))?;
            tokio::spawn(ready_when(drain.clone(), dns_configured, async { info!("configuration file applied") }));
            spawn_config_thread("dp-config-file", async move { source.watch(applier, names, dns).await })?;
        }
        Source::Cp(inputs) => {
            let dir = crate::work_dir::WorkDir::resolve(args.work_dir.as_deref())?;
            info!(path = %dir.path().display(), "work directory");
            // Bound now, served once the bootstrap has said which applications to add.
            let socket = crate::metrics_socket::socket_path(dir.path(), &inputs.name, &inputs.mesh);
            let metrics = crate::metrics_socket::bind(&socket)
                .inspect_err(|e| warn!("{e}; the control plane's Prometheus listener will not reach dp's stats"))
                .ok();
            // MeshAccessLog's TCP backends log into this pipe; dp sends the lines on.
            let al_path = crate::access_log::pipe::path(dir.path(), &inputs.name, &inputs.mesh);
            match crate::access_log::pipe::open(&al_path) {
                Ok(rx) => {
                    tokio::spawn(crate::access_log::pipe::stream(rx, al_path));
                }
                Err(e) => warn!("{e}; MeshAccessLog TCP backends will not get dp's access logs"),
            }
            let (mut status, apps) = crate::control::start(&args, dir.path(), inputs, applier).await?;
            if let Some(l) = metrics {
                info!(path = %socket.display(), applications = apps.len(), "metrics socket listening");
                let scraper = crate::metrics_socket::Scraper::new(apps, args.transparent_proxy);
                tokio::spawn(crate::metrics_socket::serve(l, ctx.clone(), scraper));
            }
            work_dir = Some(dir);
            // Ready once every subscribed type (secrets included, so TLS routes are not
            // still waiting) has been accepted at least once.
            let applied = async move {
                let needed = crate::control::type_urls();
                let _ = status.wait_for(|s| needed.iter().all(|t| s.acked_types.contains(t))).await;
                info!("first configuration from the control plane applied");
            };
            tokio::spawn(ready_when(drain.clone(), dns_configured, applied));
        }
    }

    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
        _ = quit.notified() => {}
    }
    // Readiness first, so load balancers stop sending; then close the listeners.
    drain.begin();
    let accept_loops = listeners.lock().unwrap_or_else(|e| e.into_inner()).stop_all();
    for task in accept_loops {
        let _ = task.await;
    }
    info!(drain_time = ?args.drain_time, active = drain.active(), "draining: listeners closed, waiting for live connections");
    tokio::select! {
        left = drain.wait(args.drain_time) => {
            if left > 0 {
                warn!(connections = left, "drain time is over; closing the remaining connections");
                // Each cut connection writes its access-log line (flag DRAIN) as it goes.
                drain.cut();
                let _ = drain.wait(Duration::from_secs(1)).await;
            } else {
                info!("all connections finished");
            }
        }
        _ = term.recv() => warn!("second signal: exiting without waiting for connections"),
        _ = int.recv() => warn!("second signal: exiting without waiting for connections"),
    }
    drop(work_dir);
    Ok(())
}

/// `--xds-file`: the file, its last applied content, and the DNS answers its STRICT_DNS
/// clusters need.
struct FileSource {
    path: PathBuf,
    stamp: Option<(SystemTime, u64)>,
    hash: u64,
}

impl FileSource {
    fn new(path: PathBuf) -> Self {
        FileSource { path, stamp: None, hash: 0 }
    }

    fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(path).ok()?;
        Some((m.modified().ok()?, m.len()))
    }

    /// Reads and decodes the file. Errors are one line naming the file.
    async fn load(&mut self) -> Result<(Resources, DnsAnswers), String> {
        let p = self.path.display();
        self.stamp = Self::stamp(&self.path);
        let meta = std::fs::metadata(&self.path).map_err(|e| format!("--xds-file {p}: cannot read: {e}"))?;
        if meta.len() > MAX_FILE_BYTES as u64 {
            return Err(format!("--xds-file {p}: {} bytes is more than the {MAX_FILE_BYTES} allowed", meta.len()));
        }
        let bytes = std::fs::read(&self.path).map_err(|e| format!("--xds-file {p}: cannot read: {e}"))?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        self.hash = h.finish();
        // Decoded on a blocking-pool thread: a large file takes a second or more, and the
        // runtime's workers keep serving connections meanwhile.
        let version = format!("{:016x}", self.hash);
        let resources = tokio::task::spawn_blocking(move || Resources::from_file_bytes(&bytes, &version))
            .await
            .map_err(|e| format!("--xds-file {p}: decoding stopped: {e}"))?
            .map_err(|e| format!("--xds-file {p}: {e}"))?;
        let dns = resolve(&snapshot::dns_names(&resources)).await;
        Ok((resources, dns))
    }

    /// Whether the file changed since it was read, or was modified within
    /// [`FILE_SETTLE`]: a writer that rewrites it in place may not be done.
    fn still_changing(&self) -> bool {
        let now = Self::stamp(&self.path);
        now != self.stamp || now.is_some_and(|(modified, _)| modified.elapsed().is_ok_and(|age| age < FILE_SETTLE))
    }

    /// Re-applies the file when it changes, and when STRICT_DNS answers change. An
    /// invalid version is logged and counted; the previous one keeps serving.
    ///
    /// `names` and `answers`: the STRICT_DNS names of what is in force and their
    /// addresses (the resources themselves are not kept decoded; they are decoded again
    /// only when the answers change).
    async fn watch(mut self, mut applier: Applier, mut names: Vec<(String, u16)>, mut answers: DnsAnswers) {
        let mut dns_tick = tokio::time::interval(DNS_REFRESH);
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Changes are seen as they happen; the poll is only a safety net then.
        let events = self.path.file_name().and_then(|name| crate::file_watch::DirEvents::new(&dir, name));
        let mut file_tick = tokio::time::interval(if events.is_some() { FILE_SAFETY_POLL } else { FILE_POLL });
        loop {
            tokio::select! {
                _ = file_changed(&mut file_tick, events.as_ref()) => {
                    if Self::stamp(&self.path) == self.stamp {
                        continue;
                    }
                    let old_hash = self.hash;
                    match self.load().await {
                        Ok(_) if self.hash == old_hash => {}
                        Ok((resources, dns)) => {
                            let new_names = snapshot::dns_names(&resources);
                            match applier.apply(resources, &dns) {
                                Ok(()) => (names, answers) = (new_names, dns),
                                Err(e) => reject(&applier, &self.path, &e),
                            }
                        }
                        Err(e) if self.still_changing() => {
                            debug!(file = %self.path.display(), error = %e, "the file is still being written; reading it again");
                            self.stamp = None;
                        }
                        Err(e) => reject(&applier, &self.path, &e),
                    }
                }
                _ = dns_tick.tick() => {
                    if names.is_empty() {
                        continue;
                    }
                    let fresh = resolve(&names).await;
                    if fresh != answers {
                        info!("DNS answers of STRICT_DNS clusters changed");
                        let current = applier.ctx.routes.load().resources.decode();
                        match current.and_then(|r| applier.apply(r, &fresh)) {
                            Ok(()) => answers = fresh,
                            Err(e) => reject(&applier, &self.path, &e),
                        }
                    }
                }
            }
        }
    }
}

fn reject(applier: &Applier, path: &Path, e: &str) {
    applier.ctx.stats.global.config_update_rejected.inc();
    let version = applier.ctx.routes.load().version.clone();
    let e = e.strip_prefix(&format!("--xds-file {}: ", path.display())).unwrap_or(e);
    error!(file = %path.display(), keeping = %version, "configuration rejected: {e}");
}

async fn resolve(names: &[(String, u16)]) -> DnsAnswers {
    let mut out = DnsAnswers::new();
    for (host, port) in names {
        let lookup = tokio::net::lookup_host((host.as_str(), *port));
        let addrs = match tokio::time::timeout(Duration::from_secs(5), lookup).await {
            Ok(Ok(a)) => {
                let mut v: Vec<SocketAddr> = a.collect();
                v.sort();
                v
            }
            Ok(Err(e)) => {
                warn!(host = %host, error = %e, "cannot resolve STRICT_DNS endpoint");
                vec![]
            }
            Err(_) => {
                warn!(host = %host, "resolving STRICT_DNS endpoint timed out");
                vec![]
            }
        };
        out.insert((host.clone(), *port), addrs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    fn my_nice() -> i32 {
        // SAFETY: getpriority has no pointer arguments.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    #[test]
    fn the_configuration_thread_yields_to_the_data_path_and_only_it() {
        let before = my_nice();
        let (tx, rx) = std::sync::mpsc::channel();
        spawn_config_thread("dp-test-config", async move {
            let _ = tx.send(my_nice());
        })
        .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), BACKGROUND_NICE.max(before));
        assert_eq!(my_nice(), before, "the caller's thread keeps its priority");
    }
}
