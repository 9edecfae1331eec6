//! `cp run`: the control plane.

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
    let Cmd::Run(cfg) = cli.cmd;
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
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
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("Error: cannot install the SIGTERM handler: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down");
        running.shutdown();
        std::process::ExitCode::SUCCESS
    })
}
