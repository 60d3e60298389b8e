use std::process::ExitCode;

use clap::Parser;
use vpn_seed_server::config::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    common::io::log::init(&args.log_format);
    let cfg = match args.validate() {
        Ok(c) => c,
        Err(errs) => return common::io::process::config_errors(&errs),
    };
    common::io::process::run("vpn-seed-server", |shutdown| async move {
        let listeners = vpn_seed_server::Listeners::bind(&cfg).await?;
        vpn_seed_server::run(cfg, listeners, shutdown).await
    })
}
