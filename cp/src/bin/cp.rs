//! `cp run`: the control plane; `cp migrate up`: the PostgreSQL store's schema.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "cp", version, about = "Lightweight Kuma-compatible control plane (zone or global)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the control plane.
    Run(Box<cp::config::RunConfig>),
    /// Manage the schema of the PostgreSQL store.
    #[command(subcommand)]
    Migrate(Migrate),
}

#[derive(Subcommand)]
enum Migrate {
    /// Create the schema, or upgrade it to the one this cp runs on (run it before
    /// `cp run`, and again after upgrading cp).
    Up(Box<cp::config::StoreConfig>),
}

async fn migrate_up(cfg: &cp::config::StoreConfig) -> std::process::ExitCode {
    if cfg.store_type != cp::config::StoreType::Postgres {
        eprintln!(
            "Error: KUMA_STORE_TYPE is memory, which has no schema: set KUMA_STORE_TYPE=postgres (and KUMA_STORE_POSTGRES_*) to migrate a database"
        );
        return std::process::ExitCode::FAILURE;
    }
    match cp::store::postgres::PostgresStore::migrate_up(&cfg.postgres).await {
        Ok(m) if m.from == m.to => {
            println!("{}: already at schema version {}", cfg.postgres.describe(), m.to);
            std::process::ExitCode::SUCCESS
        }
        Ok(m) => {
            println!("{}: migrated from schema version {} to {}", cfg.postgres.describe(), m.from, m.to);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main() -> std::process::ExitCode {
    cp::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("KUMA_LOG_LEVEL").or_else(|_| EnvFilter::try_new("info")).unwrap_or_default(),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cfg = match cli.cmd {
        Cmd::Run(cfg) => cfg,
        Cmd::Migrate(Migrate::Up(store)) => return rt.block_on(migrate_up(&store)),
    };
    rt.block_on(async move {
        // Before anything listens: a SIGTERM that arrives before its handler is installed
        // kills the process without the shutdown below (a leader would keep its lease).
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("Error: cannot install the SIGTERM and SIGINT handlers: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        let running = match cp::components::start(*cfg).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("Error: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        };
        let c = &running.cp.cfg;
        if c.is_global() {
            tracing::info!(mode = "global", instance = %running.cp.instance_id, "control plane started");
        } else {
            let global = c.global_address.as_deref().filter(|_| c.is_federated_zone()).unwrap_or("none (standalone)");
            tracing::info!(mode = "zone", zone = %c.zone_name, global, instance = %running.cp.instance_id, "control plane started");
        }
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down");
        running.shutdown();
        // A leader on a shared store gives its lease up, so that another instance takes
        // over at once (the memory store's only instance leads until it exits).
        if running.cp.store.durable() {
            let mut leader = running.cp.leader.subscribe();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(3), leader.wait_for(|l| !*l)).await;
        }
        std::process::ExitCode::SUCCESS
    })
}
