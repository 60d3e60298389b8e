use std::process::ExitCode;

use clap::Parser;
use vpn_seed_server::config::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    common::io::log::init(&args.log_format);
    let cfg = match args.validate() {
        Ok(c) => c,
        Err(errs) => {
            for e in &errs {
                eprintln!("configuration error: {e}");
            }
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let res = rt.block_on(async {
        let listeners = vpn_seed_server::Listeners::bind(&cfg).await?;
        vpn_seed_server::run(cfg, listeners, async {
            let sig = common::io::signal::terminate().await;
            tracing::info!(signal = sig, "received signal");
        })
        .await
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "vpn-seed-server failed");
            ExitCode::from(1)
        }
    }
}
