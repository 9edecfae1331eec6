//! `dp`: the data plane binary.

use clap::Parser;
use proxy::cli::{Cli, Command};
use proxy::{app, telemetry};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut args = match cli.command {
        Command::Version => {
            println!("dp {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Run(args) => *args,
    };
    if let Err(e) = args.apply_env(|k| std::env::var(k).ok()).and_then(|()| args.validate()) {
        eprintln!("dp: {e}");
        return ExitCode::from(2);
    }
    let (log_level, flush_logs) = match telemetry::init(&cli.log_level) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("dp: --log-level: {e}");
            return ExitCode::from(2);
        }
    };
    // One crypto provider for every TLS user in the process (rustls, tonic).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    raise_fd_limit();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.concurrency > 0 {
        rt.worker_threads(args.concurrency);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dp: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(app::run(args, log_level));
    drop(rt);
    // Queued log lines first, so the error below is the last line a user sees.
    drop(flush_logs);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A proxy holds two sockets per connection: lift the soft file limit to the hard one.
#[allow(unsafe_code)]
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
